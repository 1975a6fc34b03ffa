"""A tiny converted M²SA that answers a known sentence, for the server and page tests.

A random tiny model writes random tokens and almost never [SEG], so a page test would have no
masks to show. :func:`write_answering_model` edits only ``lm_head`` of a converted model: the
hidden states that must produce each token of ``answer`` (teacher-forced, for each given image
and question) are read from the model itself, and each answer token's column gets the
least-squares vector that raises its logit by ``margin`` at exactly those states. Hidden states
do not depend on ``lm_head``, so greedy decoding then follows ``answer`` token by token through
the real model, and its [SEG] states decode masks as in any checkpoint.
"""

from __future__ import annotations

import os
import shutil

import numpy as np


def write_answering_model(src: str, dst: str, contexts, answer: str, margin: float = 40.0) -> list[int]:
    """Copies the converted model ``src`` to ``dst`` with ``lm_head`` edited so that each
    ``(rgb, question)`` in ``contexts`` is answered ``answer``. Returns the answer's token ids."""
    import jax

    import m2sa_jax
    from m2sa_jax.data import preprocess
    from m2sa_jax.models.m2sa import M2SA
    from m2sa_jax.checkpoints.converted import load_meta, save_params

    pred = m2sa_jax.load(src)
    tok, cfg, model = pred.tokenizer, pred.config, pred.model
    target = tok.encode(answer, add_bos=False) + [tok.eos_token_id]
    encode = jax.jit(lambda p, s, c: model.apply({"params": p}, s, c, method=M2SA.encode_images))
    language = jax.jit(lambda p, i, m, r: model.apply({"params": p}, i, m, r,
                                                      method=M2SA.language))
    sam = np.stack([preprocess.sam_preprocess(rgb, cfg.sam.img_size)[0] for rgb, _ in contexts])
    clip = np.stack([preprocess.clip_preprocess(rgb, cfg.llava.vision.image_size)
                     for rgb, _ in contexts])
    prompts = [pred.prompt_ids(q) for _, q in contexts]
    longest = max(len(p) for p in prompts) + len(target) - 1
    ids = np.full((len(contexts), longest), tok.pad_token_id, np.int32)   # right-padded
    mask = np.zeros(ids.shape, bool)
    for i, p in enumerate(prompts):
        ids[i, :len(p) + len(target) - 1] = p + target[:-1]
        mask[i, :len(p) + len(target) - 1] = True
    out = language(pred.params, ids, mask, encode(pred.params, sam, clip)["image_rows"])
    states = []
    for i, p in enumerate(prompts):
        pos = np.asarray(out["text_to_expanded"])[i]
        hidden = np.asarray(out["last_hidden_state"])[i]
        states += [hidden[pos[len(p) - 1 + k]] for k in range(len(target))]
    h = np.stack(states).astype(np.float64)                                  # [S, d]
    wanted = np.tile(np.asarray(target), len(contexts))                       # [S]
    params = jax.tree.map(np.asarray, pred.params)
    head = params["llava"]["language_model"]["lm_head"]["kernel"].astype(np.float64)  # [d, V]
    pinv = np.linalg.pinv(h)                                                 # [d, S]
    for token in sorted(set(wanted.tolist())):
        head[:, token] += pinv @ (margin * (wanted == token))
    params["llava"]["language_model"]["lm_head"]["kernel"] = head.astype(np.float32)
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    save_params(dst, params, load_meta(src))
    return target[:-1]
