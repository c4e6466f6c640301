"""gateway-billing: usage metering and prepaid-wallet billing for an LLM API gateway.

The package is the domain. It never imports Celery; the worker fleet lives in ``workers/``.
"""

__version__ = "0.1.0"
