"""What the web server serves: the model behind one batching queue (:class:`Service`), its
settings, and the examples the page offers. The app itself (page + API) is
:func:`m2sa_jax.inference.server.create_app`.

At start-up the model's fixed shapes are compiled in a background thread
(:meth:`SegmentEngine.warmup`); until that is done ``/api/health`` answers 503 "starting", model
requests get 503 with ``Retry-After``, and the page shows a notice. After it nothing compiles
again (``/api/health`` reports ``compiles_since_ready``). All requests, from the page and the
API alike, go through one :class:`~m2sa_jax.inference.batching.Batcher`.

Uploads stay in memory (API) or in a private temporary folder (the page's uploads and downloads,
mode 0700, removed on shutdown); no request field names a file on the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Sequence

import jax
import numpy as np

from m2sa_jax.inference.batching import Batcher, RequestTimeout
from m2sa_jax.inference.engine import Item, Segmented, SegmentEngine
from m2sa_jax.tree import count_params

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServeSettings:
    """Limits and batching of one server (the ``python -m m2sa_jax.serve`` flags)."""

    max_batch: int = 8                 # questions per model call (1 = no batching)
    row_buckets: tuple[int, ...] | None = None   # batch sizes compiled (default 1, max_batch)
    batch_window_ms: float = 20.0      # how long a request waits for others to join its batch
    max_queue: int = 64                # questions waiting at most; beyond: 503 + Retry-After
    timeout_s: float = 120.0           # per request, queueing included; beyond: 504
    max_prompt_tokens: int = 256       # prompt template + question; longer questions: 422
    max_question_chars: int = 2000
    max_body_bytes: int = 20 * 2**20   # request body; beyond: 413
    max_image_pixels: int = 20_000_000
    max_items_per_request: int = 16    # questions in one /api/segment_batch
    api_key: str | None = None         # when set, /api/* needs "Authorization: Bearer <key>"


class NotReady(Exception):
    pass


@dataclasses.dataclass
class Example:
    image: str                         # a copy inside the server's private folder
    question: str


class Service:
    """The loaded model behind the page and the API: engine, batcher, status, limits."""

    def __init__(self, predictor, settings: ServeSettings, *, name: str = "",
                 examples: Sequence[tuple[str, str]] = (), toy_model: bool = False):
        self.settings, self.name, self.toy_model = settings, name, toy_model
        self.predictor = predictor
        self.engine = SegmentEngine(predictor, rows=settings.max_batch,
                                    row_buckets=settings.row_buckets,
                                    max_prompt_tokens=settings.max_prompt_tokens,
                                    max_question_chars=settings.max_question_chars)
        self.max_image_pixels = min(settings.max_image_pixels, predictor.max_image_pixels)
        predictor.max_image_pixels = self.max_image_pixels
        self.batcher = Batcher(self.engine, window_s=settings.batch_window_ms / 1e3,
                               max_queue=settings.max_queue, timeout_s=settings.timeout_s)
        self.temp_dir = tempfile.mkdtemp(prefix="m2sa-serve-")      # mode 0700
        self.examples = self._copy_examples(examples)
        self.status, self.error, self.warmup_seconds = "starting", None, {}
        self.started_at = time.time()
        self._thread: threading.Thread | None = None

    def _copy_examples(self, examples) -> list[Example]:
        folder = os.path.join(self.temp_dir, "examples")
        os.makedirs(folder, exist_ok=True)
        out = []
        for k, (path, question) in enumerate(examples):
            dst = os.path.join(folder, f"{k + 1:02d}{os.path.splitext(path)[1].lower()}")
            shutil.copyfile(path, dst)
            out.append(Example(dst, question))
        return out

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Compiles in the background; the batcher starts once every shape is compiled."""
        def warm():
            try:
                self.warmup_seconds = self.engine.warmup()
                self.batcher.start()
                self.status = "ok"
                log.info("ready: compiled %s in %.1f s", list(self.warmup_seconds),
                         sum(self.warmup_seconds.values()))
            except Exception as e:                 # reported by /api/health and the page
                log.exception("warm-up failed")
                self.status, self.error = "failed", f"{type(e).__name__}: {e}"

        if self._thread is None:
            self._thread = threading.Thread(target=warm, name="m2sa-warmup", daemon=True)
            self._thread.start()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.status == "ok"

    def stop(self) -> None:
        self.batcher.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    # --- requests ---------------------------------------------------------------------------

    def require_ready(self) -> None:
        if self.status == "failed":
            raise NotReady(f"the model failed to start ({self.error}); see the server log")
        if self.status != "ok":
            raise NotReady("the model is still compiling (start-up); retry in a few seconds")

    def segment(self, items: Sequence[Item]) -> list[tuple[Segmented, float]]:
        """Blocking: (result, seconds queued) per item, through the shared batcher."""
        self.require_ready()
        return self.batcher.segment(items)

    async def segment_async(self, items: Sequence[Item]) -> list[tuple[Segmented, float]]:
        self.require_ready()
        entries = self.batcher.submit(items)
        futures = [asyncio.wrap_future(e.future) for e in entries]
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), self.settings.timeout_s)
        except asyncio.TimeoutError:
            for e in entries:
                e.future.cancel()
            raise RequestTimeout(f"no answer within {self.settings.timeout_s:g} s (the server is "
                                 f"busy or the request is large); retry later") from None
        return [(r, e.started - e.submitted) for r, e in zip(results, entries)]

    # --- reports ------------------------------------------------------------------------------

    def health(self) -> dict:
        return {"status": self.status, "error": self.error,
                "queue": self.batcher.pending(), "max_queue": self.settings.max_queue,
                "batches": self.batcher.batches,
                "compiles_since_ready": self.engine.compiles_since_ready(),
                "warmup_seconds": {k: round(v, 2) for k, v in self.warmup_seconds.items()},
                "uptime_s": round(time.time() - self.started_at, 1)}

    def model_info(self) -> dict:
        cfg = self.predictor.config
        e = self.engine
        return {
            "name": self.name,
            "kind": "M²SA" if cfg.variant == "m2sa" else "LISA",
            "variant": cfg.variant,
            "dtype": {"params": sorted({str(x.dtype) for x in
                                        jax.tree.leaves(self.predictor.params)}),
                      "llm_compute": np.dtype(cfg.llava.text.dtype).name,
                      "sam_compute": np.dtype(cfg.dtype).name},
            "parameters": int(count_params(self.predictor.params)),
            "llm": {"hidden_size": cfg.llava.text.hidden_size,
                    "layers": cfg.llava.text.num_hidden_layers,
                    "vocab_size": cfg.llava.text.vocab_size},
            "sam_image_size": cfg.sam.img_size,
            "toy_model": self.toy_model,
            "limits": {"max_new_tokens": self.predictor.max_new_tokens,
                       "max_prompt_tokens": e.max_prompt_tokens,
                       "max_question_chars": e.max_question_chars,
                       "max_image_pixels": self.max_image_pixels,
                       "max_body_bytes": self.settings.max_body_bytes,
                       "max_items_per_request": self.settings.max_items_per_request},
            "batching": {"max_batch": e.rows, "window_ms": self.settings.batch_window_ms,
                         "max_queue": self.settings.max_queue,
                         "timeout_s": self.settings.timeout_s,
                         "row_buckets": list(e.row_buckets),
                         "prompt_buckets": list(e.prompt_buckets),
                         "image_groups": list(e.group_sizes), "target_chunk": e.target_chunk},
        }


# --- examples from a training run ---------------------------------------------------------------

def run_config(checkpoint: str) -> dict | None:
    """The experiment config a training workdir keeps as ``config.json``, if any."""
    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and isinstance(cfg.get("data"), dict) else None


def examples_from(data_root: str, limit: int = 6) -> list[tuple[str, str]]:
    """(image path, question) pairs spread over ``data_root``'s val split (MMR layout:
    ``MMR_val.json`` + ``images/``), one question per image, rotating the question kind."""
    from m2sa_jax.data.mmr import MMRDataset

    path = os.path.join(data_root, "MMR_val.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; examples need an MMR-format folder "
                                f"(MMR_val.json + images/)")
    ds = MMRDataset(path, os.path.join(data_root, "images"), prompt="raw")
    records = ds.records
    step = max(1, len(records) // max(1, limit))
    picks = []
    for k, rec in enumerate(records[::step][:limit]):
        picks.append((rec.image_path, rec.questions[k % len(rec.questions)]))
    return picks


def find_examples(checkpoint: str, examples_dir: str | None = None, limit: int = 6
                  ) -> tuple[list[tuple[str, str]], bool]:
    """Examples for the page and whether the model is the synthetic toy: from ``examples_dir``
    when given, else from the data root named by a training run's ``config.json``."""
    cfg = run_config(checkpoint)
    toy = bool(cfg and cfg["data"].get("kind") == "synthetic")
    root = examples_dir
    if root is None and cfg and isinstance(cfg["data"].get("root"), str):
        root = cfg["data"]["root"]
        if not os.path.isabs(root) and not os.path.isdir(root):
            root = os.path.join(checkpoint, root)
    if root is None:
        return [], toy
    try:
        return examples_from(root, limit), toy
    except (FileNotFoundError, ValueError) as e:
        if examples_dir is not None:
            raise
        log.warning("no examples: %s", e)
        return [], toy
