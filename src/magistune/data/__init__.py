"""The data pipeline: sources → records → encode (ids + labels) → samples, with a cache."""
