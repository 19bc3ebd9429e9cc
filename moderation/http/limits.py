"""What an API process allows itself at once of the work untrusted content can make slow or
large: decoding images and fetching them. One of each per application (so per process),
made with it (`moderation.main.app.create_app`) and shared by every route that decodes or
fetches (thumbnails, searches by example image or URI)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from moderation.config import Settings
from moderation.images.budget import DecodeGate
from moderation.images.fetch_slots import FetchSlots

FETCHES_SETTING = "MODERATION_API_FETCHES"


@dataclass(frozen=True)
class ApiLimits:
    decodes: DecodeGate
    fetches: FetchSlots

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiLimits:
        return cls(
            decodes=DecodeGate(settings.api_decode_memory_mb * 2**20, settings.api_decodes),
            fetches=FetchSlots(
                settings.api_fetches, settings.api_fetches_per_host, settings.api_fetches_per_caller
            ),
        )


def app_limits(request: Request) -> ApiLimits:
    """The limits of the application serving `request`."""
    limits: ApiLimits = request.app.state.api_limits
    return limits


async def _app_limits(request: Request) -> ApiLimits:
    # A coroutine: as a plain `def`, FastAPI would take a trip to its thread pool for it.
    return app_limits(request)


AppLimits = Annotated[ApiLimits, Depends(_app_limits)]
