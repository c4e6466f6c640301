"""Money: exact decimals inside, cents only where money leaves the system.

* Every internal amount is a ``Decimal`` with at most ``SCALE`` (12) fractional digits, stored as
  ``NUMERIC(38, 12)``. A catalog price is accepted only if its price *per single unit* (per token,
  per image, per request) is exact at that scale, so ``count * unit price`` is always exact and no
  event is ever rounded.
* Arithmetic runs in ``EXACT``: a context with 60 digits of precision that *traps* ``Inexact``, so
  an operation that would have to round raises instead of losing a fraction of a cent silently.
* Rounding happens in one place, ``to_cents``: ROUND_HALF_EVEN to whole cents (the rule used by
  accounting standards and by Python's Decimal by default). When a series of lines is printed,
  ``CentsAllocator`` carries each line's sub-cent remainder into the next, so the printed cents
  of the lines add up to the printed cents of their exact total.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import ROUND_HALF_EVEN, Context, Decimal, Inexact, InvalidOperation, localcontext

SCALE = 12
QUANTUM = Decimal(1).scaleb(-SCALE)  # 1E-12
CENT = Decimal("0.01")
ZERO = Decimal(0)

EXACT = Context(prec=60, rounding=ROUND_HALF_EVEN, traps=[Inexact, InvalidOperation])


def is_exact_at_scale(value: Decimal) -> bool:
    """True when ``value`` has no digits beyond ``SCALE`` fractional places."""
    exponent = value.normalize(EXACT).as_tuple().exponent
    return isinstance(exponent, int) and exponent >= -SCALE


def exact(value: Decimal | int | str) -> Decimal:
    """Parse/normalise an amount to the storage scale, refusing anything that would round."""
    with localcontext(EXACT):
        number = Decimal(value)
        if not number.is_finite():
            raise ValueError(f"not a finite amount: {value!r}")
        if not is_exact_at_scale(number):
            raise ValueError(f"{value!r} has more than {SCALE} decimal places")
        return number.quantize(QUANTUM)


def sum_exact(amounts: Iterable[Decimal]) -> Decimal:
    """Sum in the exact context (the default context would round past 28 digits)."""
    total = ZERO
    for amount in amounts:
        total = EXACT.add(total, amount)
    return total


def to_cents(amount: Decimal) -> int:
    """THE rounding rule: an exact amount in USD to integer cents, ROUND_HALF_EVEN."""
    with localcontext(EXACT) as ctx:
        ctx.traps[Inexact] = False
        return int((amount / CENT).to_integral_value(rounding=ROUND_HALF_EVEN))


def format_usd(amount: Decimal) -> str:
    """An exact amount as a plain decimal string (no exponent, trailing zeros trimmed to cents)."""
    text = f"{amount.quantize(QUANTUM, context=EXACT):f}"
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0")
    frac = frac.ljust(2, "0")
    return f"{whole}.{frac}"


def format_cents(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"


class CentsAllocator:
    """Round a sequence of exact line amounts to cents so the printed lines sum to the total.

    Each line is rounded together with the remainder carried from the lines before it; the sum of
    the returned cents always equals ``to_cents`` of the running exact total.
    """

    def __init__(self) -> None:
        self._exact_total = ZERO
        self._cents_total = 0

    def line(self, amount: Decimal) -> int:
        with localcontext(EXACT):
            self._exact_total += amount
        target = to_cents(self._exact_total)
        cents = target - self._cents_total
        self._cents_total = target
        return cents

    def lines(self, amounts: Iterable[Decimal]) -> list[int]:
        return [self.line(a) for a in amounts]

    @property
    def total_cents(self) -> int:
        return self._cents_total
