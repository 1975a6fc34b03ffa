"""Jitted text generation for the LLaMA decoder: greedy or sampled (temperature, top-p).

Shapes are static so one compilation serves every call in a bucket: prompts are padded up to a
multiple of ``bucket`` tokens, the KV cache holds ``bucket + max_new_tokens`` slots, and the
token loop is a ``lax.while_loop`` that stops early once every row has emitted ``eos_id``.

Prompts may be padded on either side (pass the attention mask): the cache is written at the
same slot for every row, padding slots are never attended to, and RoPE positions count only
real tokens, so a padded row decodes exactly as it would alone. Left padding is what callers
usually build; right-padded multimodal embeddings (``Llava.embed_multimodal``) work unchanged.

For M²SA the generator can also return, for each generated token, the final-norm hidden state
that produced it (the state whose logits chose the token), which is the [SEG] embedding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m2sa_jax import quantization as quantization_lib
from m2sa_jax.models import llama


def bucket_length(n: int, bucket: int) -> int:
    """Smallest multiple of ``bucket`` that holds ``n`` tokens."""
    return max(bucket, -(-n // bucket) * bucket)


def _top_p_filter(logits, top_p):
    """Masks logits outside the smallest set whose probability reaches ``top_p``. [B, V]"""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each entry
    keep = before < top_p
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


@dataclasses.dataclass
class Generator:
    """Greedy (``temperature == 0``) or sampled generation with a static-shape KV cache.

    Call with ``params`` of a :class:`~m2sa_jax.models.llama.LlamaForCausalLM` and either
    ``input_ids`` or ``inputs_embeds`` (+ ``attention_mask``). Returns a dict of numpy arrays:
    ``tokens`` [B, max_new_tokens] (``pad_id`` after a row's eos), ``lengths`` [B] (tokens up to
    and including eos), and with ``return_hidden`` ``hidden`` [B, max_new_tokens, d].
    ``quantization`` (``"int8"``, ``"int4"`` or a :class:`~m2sa_jax.quantization.QuantSpec`):
    ``params`` come from :func:`m2sa_jax.quantization.quantize_params` with that scheme.
    """

    config: llama.LlamaConfig
    max_new_tokens: int = 32
    eos_id: int | None = 2
    pad_id: int = 0
    bucket: int = 64
    return_hidden: bool = False
    quantization: Any = None
    traces: int = 0  # how often the generation function was traced (compiled)

    def __post_init__(self):
        self.model = quantization_lib.quantize_model(llama.LlamaForCausalLM(self.config),
                                                     self.quantization)
        self._fn = jax.jit(self._generate, static_argnames=("greedy",))

    def __call__(self, params, input_ids=None, attention_mask=None, *, inputs_embeds=None,
                 temperature: float = 0.0, top_p: float = 1.0, rng=None) -> dict[str, Any]:
        prompt = np.asarray(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = prompt.shape[:2]
        mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask, bool)
        if not mask.any(axis=1).all():
            raise ValueError("every prompt row needs at least one real token (attention_mask)")
        p = bucket_length(t, self.bucket)
        pad = [(0, 0), (0, p - t)]
        if inputs_embeds is None:
            prompt = np.pad(prompt, pad, constant_values=self.pad_id)
        else:
            prompt = jnp.pad(jnp.asarray(inputs_embeds), pad + [(0, 0)])
        mask = np.pad(mask, pad)
        rng = jax.random.key(0) if rng is None else rng
        out = self._fn(params, prompt, mask, rng, jnp.float32(max(temperature, 1e-6)),
                       jnp.float32(top_p), greedy=temperature == 0.0)
        return jax.tree.map(np.asarray, out)

    def _select(self, logits, rng, temperature, top_p, greedy):
        logits = logits.astype(jnp.float32)  # [B, V]
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = _top_p_filter(logits / temperature, top_p)
        return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

    def _generate(self, params, prompt, mask, rng, temperature, top_p, *, greedy):
        self.traces += 1
        cfg, n_new = self.config, self.max_new_tokens
        b, p = mask.shape
        cache = llama.init_cache(cfg, b, p + n_new)
        last = (p - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32)  # [B] last real token
        kwargs = (dict(input_ids=prompt) if prompt.ndim == 2 else dict(inputs_embeds=prompt))
        out = self.model.apply({"params": params}, attention_mask=mask, cache=cache,
                               logits_slice=last, **kwargs)
        h0 = jnp.take_along_axis(out["last_hidden_state"], last[:, None, None], axis=1)[:, 0]
        tok = self._select(out["logits"][:, 0], jax.random.fold_in(rng, 0), temperature, top_p,
                           greedy)
        eos = -1 if self.eos_id is None else self.eos_id
        tokens = jnp.full((b, n_new), self.pad_id, jnp.int32).at[:, 0].set(tok)
        hidden = jnp.zeros((b, n_new, cfg.hidden_size), h0.dtype).at[:, 0].set(h0)
        done = tok == eos
        lengths = jnp.ones((b,), jnp.int32)

        def cond(state):
            i, _, _, done, *_ = state
            return (i < n_new) & ~jnp.all(done)

        def body(state):
            i, tokens, hidden, done, lengths, cache, tok = state
            step = self.model.apply({"params": params}, tok[:, None], cache=cache)
            h = step["last_hidden_state"][:, 0]  # [B, d]
            nxt = self._select(step["logits"][:, 0], jax.random.fold_in(rng, i), temperature,
                               top_p, greedy)
            nxt = jnp.where(done, self.pad_id, nxt)
            tokens = tokens.at[:, i].set(nxt)
            hidden = hidden.at[:, i].set(jnp.where(done[:, None], 0, h).astype(hidden.dtype))
            lengths = lengths + (~done).astype(jnp.int32)
            done = done | (nxt == eos)
            return i + 1, tokens, hidden, done, lengths, step["cache"], nxt

        state = (jnp.int32(1), tokens, hidden, done, lengths, out["cache"], tok)
        _, tokens, hidden, done, lengths, _, _ = jax.lax.while_loop(cond, body, state)
        result = dict(tokens=tokens, lengths=lengths)
        if self.return_hidden:
            result["hidden"] = hidden
        return result
