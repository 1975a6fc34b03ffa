"""Generate-then-segment at a small fixed set of compiled shapes, for a server.

``M2SAPredictor.segment_batch`` sizes each call by what it is given (number of images and
questions, prompt bucket, [SEG] count, and a mask canvas that follows the largest image), so a
server fed arbitrary images would compile on the request path. :class:`SegmentEngine` runs the
same model functions with shapes from a fixed set, all compiled by :meth:`SegmentEngine.warmup`:

* images are encoded in groups of the predictor's ``image_batch`` (single images for the
  remainder) into ``rows`` fixed slots, each distinct image once per batch;
* the language model sees 1 or ``rows`` prompts (``row_buckets``; padding rows hold just an
  image), each padded to one of the predictor's 64-token buckets up to ``max_prompt_tokens``
  (longer ones are refused), so a lone request does not pay for a full batch;
* [SEG]s are decoded ``target_chunk`` at a time to SAM's fixed-size low-res logits;
* the resize to each image's own size runs on the host (``sam.postprocess_masks_host``, the
  same bilinear weights), so the image size never reaches a compiled shape.

Masks equal ``predictor.segment`` on the same input (tests/test_serve.py), and
:class:`CompileCounter` shows that nothing compiles after the warm-up.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2sa_jax.data import preprocess
from m2sa_jax.data.tokenizer import IMAGE_TOKEN_INDEX
from m2sa_jax.models import sam as sam_lib
from m2sa_jax.models.m2sa import M2SA
from m2sa_jax.inference.predictor import mask_labels

DEFAULT_MAX_QUESTION_CHARS = 2000   # refused before tokenizing


class InputError(ValueError):
    """Input the engine refuses; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class CompileCounter:
    """XLA compilations in this process, from jax.monitoring's backend-compile events."""

    _EVENT = "/jax/core/compile/backend_compile_duration"
    _count = 0
    _lock = threading.Lock()
    _installed = False

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if not cls._installed:
                jax.monitoring.register_event_duration_secs_listener(cls._on_event)
                cls._installed = True

    @classmethod
    def _on_event(cls, event: str, duration: float, **kwargs) -> None:
        if event == cls._EVENT:
            with cls._lock:
                cls._count += 1

    @classmethod
    def count(cls) -> int:
        return cls._count


@dataclasses.dataclass
class Item:
    """One question about one image, checked and tokenized (see :meth:`SegmentEngine.prepare`)."""

    image: np.ndarray                 # RGB uint8 [H, W, 3]
    question: str
    prompt: list[int]
    max_new_tokens: int
    image_key: Hashable               # items with the same key share one encoding per batch


@dataclasses.dataclass
class Segmented:
    question: str
    answer: str                       # generated text, [SEG] tokens included
    labels: list[str]                 # the phrase before each [SEG]
    mask_logits: np.ndarray           # float32 [N, H, W] at the image's size
    tokens: list[int]                 # the answer's token ids (eos dropped)
    timings: dict                     # of the batch this item ran in

    @property
    def masks(self) -> np.ndarray:
        return self.mask_logits > 0


def _round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


class SegmentEngine:
    """Batches of up to ``rows`` items through a predictor's model at fixed shapes.

    Arguments:
      predictor: an ``M2SAPredictor`` (``m2sa_jax.load``); its params, tokenizer, generator
        (``max_new_tokens``, prompt bucket) and ``image_batch`` are used as they are.
      rows: questions per model call (the server's largest batch).
      max_prompt_tokens: longest prompt (template + question) accepted; prompts are padded to
        64-token buckets up to this, one compilation each.
      target_chunk: [SEG]s per mask-decoder call.
      row_buckets: batch sizes the language model is compiled for (default 1 and ``rows``); a
        batch runs at the smallest that holds it.
    """

    def __init__(self, predictor, *, rows: int = 8, max_prompt_tokens: int = 256,
                 target_chunk: int | None = None, row_buckets: Sequence[int] | None = None,
                 max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS):
        self.predictor = p = predictor
        cfg = p.config
        if rows < 1:
            raise ValueError(f"rows must be at least 1, got {rows}")
        self.rows = rows
        self.row_buckets = tuple(sorted(set(row_buckets or (1, rows))))
        if self.row_buckets[-1] != rows or self.row_buckets[0] < 1:
            raise ValueError(f"row_buckets {self.row_buckets} must lie in 1..{rows} and "
                             f"include rows={rows}")
        self.group_sizes = (p.image_batch, 1) if 1 < p.image_batch <= rows else (1,)
        self.target_chunk = target_chunk or p.target_bucket
        self.max_question_chars = max_question_chars
        step = p.generator.bucket
        limit = (cfg.llava.text.max_position_embeddings - cfg.llava.num_image_rows + 1
                 - p.max_new_tokens)
        self.max_prompt_tokens = min(max_prompt_tokens, limit)
        shortest = len(p.prompt_ids("?"))
        if shortest > self.max_prompt_tokens:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} is below the prompt "
                             f"template's own {shortest} tokens; raise it")
        self.prompt_buckets = tuple(range(_round_up(shortest, step),
                                          _round_up(self.max_prompt_tokens, step) + 1, step))
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.compiles_at_ready: int | None = None
        self._rng = jax.random.key(0)
        self.image_slots = rows
        m = p.model

        def encode_into(params, slots, sam, clip, start):
            enc = m.apply({"params": params}, sam, clip, method=M2SA.encode_images)
            return jax.tree.map(lambda s, e: jax.lax.dynamic_update_slice_in_dim(
                s, e.astype(s.dtype), start, axis=0), slots, enc)

        def embed(params, ids, am, image_rows, image_of):
            return m.apply({"params": params}, ids, am, image_rows[image_of],
                           method=lambda mod, *a: mod.llava.embed_multimodal(*a))

        def low_res(params, hidden, seg_image, image_embeddings, early_features):
            return m.apply({"params": params}, hidden, seg_image, image_embeddings,
                           early_features, method=M2SA.low_res_masks_from_hidden)["low_res_masks"]

        self._encode_into = jax.jit(encode_into)
        self._embed = jax.jit(embed)
        self._low_res = jax.jit(low_res)
        size, clip_size = cfg.sam.img_size, cfg.llava.vision.image_size
        shapes = jax.eval_shape(
            lambda prm, s, c: m.apply({"params": prm}, s, c, method=M2SA.encode_images),
            p.params, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, clip_size, clip_size, 3), jnp.float32))
        self._empty_slots = {k: jnp.zeros((self.image_slots,) + v.shape[1:], v.dtype)
                             for k, v in shapes.items()}
        CompileCounter.install()

    # --- requests ---------------------------------------------------------------------------

    def prepare(self, image: np.ndarray, question: str, *, max_new_tokens: int | None = None,
                image_key: Hashable | None = None) -> Item:
        """Checks one (image, question); raises :class:`InputError` saying what to change."""
        p = self.predictor
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise InputError(f"image: expected RGB uint8 [H, W, 3], got {image.dtype} "
                             f"{image.shape}", 400)
        h, w = image.shape[:2]
        if h * w > p.max_image_pixels:
            raise InputError(f"image: {w}×{h} = {h * w / 1e6:.1f} MP is above this server's "
                             f"limit of {p.max_image_pixels / 1e6:g} MP; send a smaller image", 413)
        if not isinstance(question, str) or not question.strip():
            raise InputError("question: empty; ask something about the image, e.g. "
                             "\"Which parts would you hold to carry both cups?\"")
        if len(question) > self.max_question_chars:
            raise InputError(f"question: {len(question)} characters is above this server's "
                             f"limit of {self.max_question_chars}; shorten it")
        try:
            prompt = p.prompt_ids(question)
        except ValueError as e:
            raise InputError(f"question: {e}") from None
        if len(prompt) > self.max_prompt_tokens:
            raise InputError(f"question: too long, {len(prompt)} tokens with the prompt template "
                             f"where this server takes up to {self.max_prompt_tokens}; shorten it")
        if max_new_tokens is None:
            max_new_tokens = p.max_new_tokens
        if not 1 <= max_new_tokens <= p.max_new_tokens:
            raise InputError(f"max_new_tokens: {max_new_tokens} is outside 1..{p.max_new_tokens} "
                             f"(this server's generation length)")
        return Item(image=image, question=question, prompt=prompt,
                    max_new_tokens=int(max_new_tokens),
                    image_key=id(image) if image_key is None else image_key)

    def run(self, items: Sequence[Item]) -> list[Segmented]:
        """Answers and masks for 1..``rows`` items, in one model pass."""
        if not 1 <= len(items) <= self.rows:
            raise ValueError(f"a batch holds 1..{self.rows} items, got {len(items)}")
        with self.lock:
            return self._run(items)

    # --- compiled pieces ----------------------------------------------------------------------

    def _encode(self, images: Sequence[np.ndarray]) -> dict:
        """Distinct images → encodings in the fixed ``image_slots`` (first ``len(images)`` used)."""
        cfg = self.predictor.config
        size, clip_size = cfg.sam.img_size, cfg.llava.vision.image_size
        slots, start = self._empty_slots, 0
        for g in self.group_sizes:
            while len(images) - start >= g:
                sam = np.stack([preprocess.sam_preprocess(im, size)[0]
                                for im in images[start:start + g]])
                clip = np.stack([preprocess.clip_preprocess(im, clip_size)
                                 for im in images[start:start + g]])
                slots = self._encode_into(self.predictor.params, slots, sam, clip, np.int32(start))
                start += g
        return slots

    def bucket_of(self, item: Item) -> int:
        """The prompt bucket ``item`` runs in (items of one bucket batch well together)."""
        return self._bucket_for(len(item.prompt))

    def _bucket_for(self, n: int) -> int:
        for t in self.prompt_buckets:
            if n <= t:
                return t
        raise InputError(f"a prompt of {n} tokens is longer than the largest compiled bucket "
                         f"({self.prompt_buckets[-1]})")

    def _generate(self, ids: np.ndarray, am: np.ndarray, slots: dict, image_of: np.ndarray):
        p = self.predictor
        mm = self._embed(p.params, ids, am, slots["image_rows"], image_of)
        return p.generator(p.params["llava"]["language_model"], inputs_embeds=mm["inputs_embeds"],
                           attention_mask=mm["attention_mask"], rng=self._rng)

    def _run(self, items: Sequence[Item]) -> list[Segmented]:
        p, t0 = self.predictor, time.perf_counter()
        slot_of, images, which = {}, [], []
        for it in items:
            if it.image_key not in slot_of:
                slot_of[it.image_key] = len(images)
                images.append(it.image)
            which.append(slot_of[it.image_key])
        slots = self._encode(images)
        t1 = time.perf_counter()

        t = self._bucket_for(max(len(it.prompt) for it in items))
        rows = next(r for r in self.row_buckets if r >= len(items))
        ids = np.full((rows, t), p.tokenizer.pad_token_id, np.int32)
        am = np.zeros((rows, t), bool)
        for i, it in enumerate(items):
            ids[i, :len(it.prompt)] = it.prompt
            am[i, :len(it.prompt)] = True
        ids[len(items):, 0] = IMAGE_TOKEN_INDEX            # padding rows: just an image
        am[len(items):, 0] = True
        image_of = np.zeros((rows,), np.int32)
        image_of[:len(items)] = which
        gen = self._generate(ids, am, slots, image_of)
        t2 = time.perf_counter()

        answers, tokens, seg_rows = [], [], []
        for i, it in enumerate(items):
            toks = gen["tokens"][i, :gen["lengths"][i]].tolist()[:it.max_new_tokens]
            if toks and toks[-1] == p.tokenizer.eos_token_id:
                toks = toks[:-1]
            tokens.append(toks)
            answers.append(p.tokenizer.decode(toks))
            seg_rows.append([k for k, tok in enumerate(toks) if tok == p.seg_id])
        flat = [(i, k) for i, ks in enumerate(seg_rows) for k in ks]
        low = self._decode_masks(flat, gen["hidden"], which, slots)
        t3 = time.perf_counter()

        size = p.config.sam.img_size
        results, j = [], 0
        for i, it in enumerate(items):
            n = len(seg_rows[i])
            h, w = it.image.shape[:2]
            if n:
                resized = preprocess.resize_longest_side_shape(h, w, size)
                logits = sam_lib.postprocess_masks_host(low[j:j + n], resized, (h, w), size)
            else:
                logits = np.zeros((0, h, w), np.float32)
            j += n
            results.append(Segmented(question=it.question, answer=answers[i],
                                     labels=mask_labels(answers[i]), mask_logits=logits,
                                     tokens=tokens[i], timings={}))
        t4 = time.perf_counter()
        timings = dict(batch_size=len(items), encode_ms=1e3 * (t1 - t0),
                       generate_ms=1e3 * (t2 - t1), masks_ms=1e3 * (t3 - t2),
                       resize_ms=1e3 * (t4 - t3))
        for r in results:
            r.timings = timings
        return results

    def _decode_masks(self, flat, hidden_all, which, slots) -> np.ndarray:
        """Low-res logits [len(flat), h, w] of the [SEG]s at (item, token) positions ``flat``."""
        hidden_all = np.asarray(hidden_all)                  # [rows, max_new_tokens, d]
        c = self.target_chunk
        out = []
        for start in range(0, len(flat), c):
            chunk = flat[start:start + c]
            hidden = np.zeros((c, hidden_all.shape[-1]), hidden_all.dtype)
            seg_image = np.zeros((c,), np.int32)
            for r, (i, k) in enumerate(chunk):
                hidden[r] = hidden_all[i, k]
                seg_image[r] = which[i]
            low = self._low_res(self.predictor.params, hidden, seg_image,
                                slots["image_embeddings"], slots["early_features"])
            out.append(np.asarray(low)[:len(chunk)])
        if not out:
            return np.zeros((0, 1, 1), np.float32)
        return np.concatenate(out)

    # --- start-up -------------------------------------------------------------------------------

    def warmup(self) -> dict:
        """Compiles every shape :meth:`run` uses (each prompt bucket, each image group size, the
        mask decoder), then answers one question end to end. Returns seconds per step."""
        p, seconds = self.predictor, {}
        cfg = p.config
        size, clip_size = cfg.sam.img_size, cfg.llava.vision.image_size
        with self.lock:
            t = time.perf_counter()
            slots = self._empty_slots
            for g in self.group_sizes:
                slots = self._encode_into(p.params, slots, np.zeros((g, size, size, 3), np.float32),
                                          np.zeros((g, clip_size, clip_size, 3), np.float32),
                                          np.int32(0))
            jax.block_until_ready(slots)
            seconds["encode"] = time.perf_counter() - t
            for rows in self.row_buckets:
                for bucket in self.prompt_buckets:
                    t = time.perf_counter()
                    ids = np.full((rows, bucket), p.tokenizer.pad_token_id, np.int32)
                    ids[:, 0] = IMAGE_TOKEN_INDEX
                    am = np.zeros((rows, bucket), bool)
                    am[:, 0] = True
                    gen = self._generate(ids, am, slots, np.zeros((rows,), np.int32))
                    seconds[f"generate_{rows}x{bucket}"] = time.perf_counter() - t
            t = time.perf_counter()
            self._decode_masks([(0, 0)], gen["hidden"], [0], slots)
            seconds["masks"] = time.perf_counter() - t
            t = time.perf_counter()
            image = np.full((48, 80, 3), 128, np.uint8)
            self._run([self.prepare(image, "What is in the picture?")])
            seconds["end_to_end"] = time.perf_counter() - t
        self.compiles_at_ready = CompileCounter.count()
        self.ready.set()
        return seconds

    def compiles_since_ready(self) -> int | None:
        """XLA compilations in this process since :meth:`warmup` finished (0 is the goal)."""
        if self.compiles_at_ready is None:
            return None
        return CompileCounter.count() - self.compiles_at_ready
