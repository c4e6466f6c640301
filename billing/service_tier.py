"""Service tier: a price dimension of a request (how the provider scheduled it).

* ``standard``: on-demand, the price sheet a catalog version lists under ``prices``;
* ``batch``: asynchronous batch APIs (OpenAI Batch, Anthropic Message Batches, Gemini batch
  mode), usually half price;
* ``flex``: OpenAI/Gemini "flex" processing (slower, cheaper, may be refused);
* ``priority``: OpenAI/Gemini priority processing (faster, at a premium).

A catalog version prices a non-standard tier only if it lists it explicitly
(``[version.tiers.batch]`` etc.); an event in a tier its version does not price is parked as
``unpriced`` (field ``$.service_tier``), never billed at another tier's price.
"""

from __future__ import annotations

from enum import StrEnum


class ServiceTier(StrEnum):
    STANDARD = "standard"
    BATCH = "batch"
    FLEX = "flex"
    PRIORITY = "priority"
