-- An account's zone may not be a name PostgreSQL also reads as a fixed-offset abbreviation.
--
-- Why: CET, EET, MET and WET are listed in pg_timezone_names (IANA zones with summer time), but
-- make_timestamptz and AT TIME ZONE read them as the abbreviations of pg_timezone_abbrevs, a fixed
-- UTC+01:00 (and so on) all year. A CET account's July then started at 01:00 local summer time:
-- its first hour fell in June's statement, and the report's days were shifted alike (WET: UTC+0
-- all year instead of WEST in summer). Any name that is also an abbreviation is refused (EST, HST
-- and MST too: fixed either way, but one rule is easier to state), except UTC, GMT and UCT. A
-- region name (Europe/Paris) or Etc/GMT-1 says what is meant.
--
-- An account already set to such a name keeps it (this trigger checks new values only): its
-- issued statements were cut that way, and its zone cannot move once one was issued.

-- NULL when the zone can cut an account's periods; otherwise why not.
CREATE FUNCTION billing_time_zone_problem(p_time_zone text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = p_time_zone)
            THEN format('unknown time zone %s (see pg_timezone_names)', p_time_zone)
        WHEN EXISTS (SELECT 1 FROM pg_timezone_abbrevs
                     WHERE abbrev = p_time_zone AND abbrev NOT IN ('UTC', 'GMT', 'UCT'))
            THEN format('time zone %s is refused: PostgreSQL reads it as a fixed-offset '
                        'abbreviation, without summer time; use a region name such as '
                        'Europe/Paris, or Etc/GMT-1 for a fixed offset', p_time_zone)
    END
$$;

CREATE OR REPLACE FUNCTION billing_check_time_zone() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    problem text := billing_time_zone_problem(NEW.time_zone);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
