"""Every ORM model, imported in one place so the metadata is complete (Alembic, tests)."""

from moderation.audit.models import AuditEvent
from moderation.auth.models import ApiKey
from moderation.banks.models import Bank, BankChange, BankEntry, BankEntryEmbedding
from moderation.db import Base
from moderation.embedding.models import Embedding, EmbeddingModel
from moderation.evaluation.models import (
    EvaluationFigures,
    EvaluationRun,
    GoldenQuery,
    GoldenRelevant,
)
from moderation.evidence.models import Evidence
from moderation.lifecycle.models import ReembedFailure, ReembedJob
from moderation.retrohunt.models import RetrohuntJob
from moderation.review.models import Hit, ReviewClaim
from moderation.screening.models import Signal, Upload, Worker
from moderation.search.models import IndexEvaluation, MilvusSyncState, SearchChange
from moderation.web.models import PendingForm, WebSession
from moderation.webhooks.models import WebhookAttempt, WebhookEvent

__all__ = [
    "ApiKey",
    "AuditEvent",
    "Bank",
    "BankChange",
    "BankEntry",
    "BankEntryEmbedding",
    "Base",
    "Embedding",
    "EmbeddingModel",
    "EvaluationFigures",
    "EvaluationRun",
    "Evidence",
    "GoldenQuery",
    "GoldenRelevant",
    "Hit",
    "IndexEvaluation",
    "MilvusSyncState",
    "PendingForm",
    "ReembedFailure",
    "ReembedJob",
    "RetrohuntJob",
    "ReviewClaim",
    "SearchChange",
    "Signal",
    "Upload",
    "WebSession",
    "WebhookAttempt",
    "WebhookEvent",
    "Worker",
]
