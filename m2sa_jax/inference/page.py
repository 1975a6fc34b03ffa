"""The page at ``/``: upload an image (or pick an example), ask, see the answer and its masks.

The answer is shown with each [SEG] phrase in its mask's colour, over a legend (colour, label,
area); the overlay can show any subset of the masks; downloads are the mask PNGs as a zip and
the masks as COCO RLE JSON. Submissions go through the server's shared batcher, like API
requests. Bad input is answered with a message (``gr.Error``), never a stack trace.
"""

from __future__ import annotations

import html
import json
import os
import time
import uuid
from typing import TYPE_CHECKING

import numpy as np

from m2sa_jax.inference.batching import QueueFull, RequestTimeout
from m2sa_jax.inference.engine import InputError
from m2sa_jax.inference.formats import (answer_spans, coco_annotations, decode_upload,
                                        mask_colour, masks_zip)
from m2sa_jax.inference.overlay import overlay

if TYPE_CHECKING:
    from m2sa_jax.inference.service import Service

TOY_NOTICE = ("**A toy model.** This is the README demo's M²SA (2.5 M parameters), trained from "
              "scratch on two CPU cores on drawings of cups, lamps, chairs, bottles and cars in "
              "flat colours. "
              "It answers questions about such drawings (try the examples), not about photographs.")

CSS = """
.m2sa-answer { font-size: 1.1rem; line-height: 1.8; }
.m2sa-answer .seg { border-radius: 4px; padding: 1px 5px; color: #111; font-weight: 600; }
.m2sa-legend { list-style: none; padding: 0; margin: 8px 0 0 0; }
.m2sa-legend li { display: flex; align-items: center; gap: 8px; margin: 2px 0; }
.m2sa-legend .swatch { width: 14px; height: 14px; border-radius: 3px; display: inline-block; }
.m2sa-legend .area { color: #777; font-size: 0.9em; }
.m2sa-empty { color: #777; }
"""


def _status_markdown(service: "Service") -> str:
    if service.status == "ok":
        return ""
    if service.status == "failed":
        return f"⚠️ **The model failed to start:** {html.escape(str(service.error))}"
    return ("⏳ **Compiling the model** (start-up, once): the page answers as soon as every "
            "shape is compiled — usually well under a minute for the demo model.")


def answer_html(result) -> str:
    """The answer with each mask's phrase highlighted in its colour, then the legend."""
    if not result.answer.strip():
        text = '<span class="m2sa-empty">(the model gave an empty answer)</span>'
    else:
        parts = []
        for t, k in answer_spans(result.answer, result.labels):
            if k is None:
                parts.append(html.escape(t))
            else:
                parts.append(f'<span class="seg" data-mask="{k + 1}" style="background:'
                             f'{mask_colour(k)}66; border-bottom: 3px solid {mask_colour(k)}">'
                             f'{html.escape(t)}</span>')
        text = "".join(parts)
    h, w = result.mask_logits.shape[1:]
    rows = []
    for k, (label, m) in enumerate(zip(result.labels, result.masks)):
        share = 100.0 * m.sum() / max(1, h * w)
        rows.append(f'<li data-mask="{k + 1}"><span class="swatch" style="background:'
                    f'{mask_colour(k)}"></span><b>{k + 1}</b> {html.escape(label or f"mask {k + 1}")}'
                    f' <span class="area">{share:.1f}% of the image</span></li>')
    legend = (f'<ul class="m2sa-legend">{"".join(rows)}</ul>' if rows else
              '<p class="m2sa-empty">No masks: the answer has no [SEG].</p>')
    return f'<div class="m2sa-answer">{text}</div>{legend}'


def mount_page(app, service: "Service"):
    # Gradio keeps uploads and served outputs in its cache: put it in the private folder.
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(service.temp_dir, "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    settings = service.settings
    downloads = os.path.join(service.temp_dir, "downloads")
    os.makedirs(downloads, exist_ok=True)

    def segment(image_path, question):
        if service.status != "ok":
            raise gr.Error(_status_markdown(service).replace("*", "") or "not ready")
        if not image_path:
            raise gr.Error("Upload an image (or pick an example) first.")
        try:
            with open(image_path, "rb") as f:
                data = f.read(settings.max_body_bytes + 1)
            if len(data) > settings.max_body_bytes:
                raise InputError(f"the image file is larger than this server's limit of "
                                 f"{settings.max_body_bytes / 2**20:g} MiB", 413)
            rgb = decode_upload(data, "the image", service.max_image_pixels)
            item = service.engine.prepare(rgb, question or "")
            t0 = time.perf_counter()
            (result, queued), = service.segment([item])
            total = time.perf_counter() - t0
        except (InputError, QueueFull, RequestTimeout) as e:
            raise gr.Error(str(e)) from None
        shown = list(range(len(result.labels)))
        folder = os.path.join(downloads, uuid.uuid4().hex)
        os.makedirs(folder)
        files = []
        if len(result.labels):
            files = [os.path.join(folder, "masks.zip"), os.path.join(folder, "masks_coco_rle.json")]
            with open(files[0], "wb") as f:
                f.write(masks_zip(result))
            with open(files[1], "w") as f:
                json.dump({"question": result.question, "answer": result.answer,
                           "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
                           "annotations": coco_annotations(result)}, f)
        timing = (f"Answered in **{total:.2f} s** (queued {1e3 * queued:.0f} ms, batch of "
                  f"{result.timings['batch_size']}) · image {rgb.shape[1]}×{rgb.shape[0]}")
        choices = [(f"{k + 1}: {lab or f'mask {k + 1}'}", k) for k, lab in enumerate(result.labels)]
        return (overlay(rgb, result.masks), answer_html(result),
                gr.CheckboxGroup(choices=choices, value=shown, visible=bool(choices)),
                timing, files or None, (rgb, result.masks))

    def toggle(shown, state):
        if not state:
            return None
        rgb, masks = state
        keep = np.zeros(len(masks), bool)
        keep[[int(k) for k in shown or []]] = True
        return overlay(rgb, masks & keep[:, None, None])      # colours stay with their mask

    def status():
        text = _status_markdown(service)
        return gr.Markdown(text, visible=bool(text)), gr.Timer(active=service.status == "starting")

    info = service.model_info()
    with gr.Blocks(title="M²SA — segment by asking", fill_width=False) as page:
        gr.Markdown(f"# M²SA — segment by asking\n"
                    f"Ask about an image; the answer names each target and every `[SEG]` in "
                    f"it becomes a mask. Model: **{html.escape(info['name'] or 'M²SA')}** "
                    f"({info['kind']}, {info['parameters'] / 1e6:,.1f} M parameters).")
        if service.toy_model:
            gr.Markdown(TOY_NOTICE, elem_id="toy-notice")
        banner = gr.Markdown(_status_markdown(service), elem_id="status",
                             visible=service.status != "ok")
        state = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                image_in = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                                    height=340, elem_id="image-in")
                question_in = gr.Textbox(label="Question", lines=2, elem_id="question",
                                         max_length=settings.max_question_chars,
                                         placeholder="e.g. Which parts would you hold to carry "
                                                     "both cups?")
                submit = gr.Button("Segment", variant="primary", elem_id="submit")
                if service.examples:
                    gr.Examples([[e.image, e.question] for e in service.examples],
                                inputs=[image_in, question_in],
                                label="Examples (images and questions from the val split)")
            with gr.Column(scale=1):
                overlay_out = gr.Image(label="Masks", format="png", interactive=False,
                                       height=340, elem_id="overlay")
                answer_out = gr.HTML(elem_id="answer",
                                     value='<p class="m2sa-empty">The answer appears here.</p>')
                toggles = gr.CheckboxGroup(label="Show masks", type="value", visible=False,
                                           elem_id="toggles")
                timing_out = gr.Markdown(elem_id="timing")
                files_out = gr.File(label="Downloads: mask PNGs (zip) and COCO RLE (JSON)",
                                    file_count="multiple", interactive=False, elem_id="downloads")
        outputs = [overlay_out, answer_out, toggles, timing_out, files_out, state]
        submit.click(segment, [image_in, question_in], outputs, concurrency_limit=None)
        question_in.submit(segment, [image_in, question_in], outputs, concurrency_limit=None)
        toggles.change(toggle, [toggles, state], overlay_out, concurrency_limit=None)
        timer = gr.Timer(2.0, active=service.status == "starting")
        timer.tick(status, outputs=[banner, timer])
        page.load(status, outputs=[banner, timer])

    auth = None
    if settings.api_key:
        import hmac

        key = settings.api_key
        auth = lambda username, password: hmac.compare_digest(password.encode(), key.encode())  # noqa: E731
    font = ["ui-sans-serif", "system-ui", "sans-serif"]   # system fonts: no font downloads
    theme = gr.themes.Soft(font=font, font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(app, page, path="/", auth=auth,
                               auth_message="Log in with any user name and the server's API key.",
                               max_file_size=settings.max_body_bytes, show_error=True,
                               ssr_mode=False, theme=theme, css=CSS, footer_links=["api"])
