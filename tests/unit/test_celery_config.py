"""All Celery configuration lives in workers/app.py; check the parts that protect money."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import json
from workers.app import app
c = app.conf
route = lambda name: app.amqp.router.route({}, name)["queue"]
print(json.dumps({
    "serializer": c.task_serializer, "accept": list(c.accept_content),
    "acks_late": c.task_acks_late, "reject_on_lost": c.task_reject_on_worker_lost,
    "queues": [[q.name, q.exchange.name, q.routing_key] for q in c.task_queues],
    "export": route("billing.export_period").name, "relay": route("billing.relay_outbox").name,
}))
"""


def test_json_only_late_acks_and_one_binding_per_queue(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
            "BILLING_DATA_DIR": str(tmp_path),
        }
    )
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        check=True,
    ).stdout
    conf = json.loads(out)
    assert conf["serializer"] == "json" and conf["accept"] == ["json"]
    assert conf["acks_late"] and conf["reject_on_lost"]
    # each queue on its own exchange and key: a task is delivered to exactly one queue
    assert conf["queues"] == [["billing.tasks"] * 3, ["billing.exports"] * 3]
    assert (conf["export"], conf["relay"]) == ("billing.exports", "billing.tasks")
