"""Evidence: a review copy of what screening saw of an upload that hit, sealed at rest,
retained for a period, read only through audited calls (docs/evidence.md)."""
