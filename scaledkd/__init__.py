"""scaledkd: knowledge distillation for transformer language models at the scale where the teacher is sharded."""
from __future__ import annotations

__version__ = "0.1.0"
