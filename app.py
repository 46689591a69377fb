"""
A local web page for editing: upload a photo (or pick a built-in one), type a request, and watch the agent team at
work: the planner's raw output, its plan as a table (action, subject, goal), the order the sequencing agent chose,
each step's region mask drawn over the image with the region agent's note, and before | after side by side, with
the edited image (full resolution) and the JSON trace to download.

    python app.py                                   # http://127.0.0.1:7860 on the cpu preset
    python app.py --adapter runs/default/adapter --port 8000
    python app.py --preset gpu24                    # a CUDA GPU: the paper's models, as edit.py --preset gpu24

The page runs edit.py's code: its checks (the same messages for an empty request, a file that is not an image, an
adapter of another preset) and `edit.edit_image`. A planner switch picks the base planner, the newest trained
adapter under runs/, or a chosen adapter folder, to see what RL changed; each planner loads once, on first use
(two are kept), the agents on their first use. One request runs at a time; the others wait in the queue.
On gpu24 with its GPU agents the memory plan holds: the planner and those agents are never resident together, so
each request loads the planner, plans, drops it, and then loads the agents (minutes, not seconds).

Bound to 127.0.0.1 (this machine only); `--share` asks Gradio for a public link, which needs the internet.
Gradio is imported here only: train.py and edit.py never pay for it.
"""
import argparse
import atexit
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

import edit
from data import builtin_image, image_names
from planner import PRESETS, newest_adapter

MAX_BYTES = 50 * 2**20  # an upload larger than this is refused (edit.py takes any size PIL opens safely)
PLANNERS = ["base", "newest trained", "chosen adapter"]
TINT = np.array([255, 0, 96], np.float32)  # a mask is drawn in this colour over the image


class PageError(Exception):
    """Bad input or a request that could not run: its message goes on the page, never a stack trace."""


@contextlib.contextmanager
def page_errors(path=None):
    """Turn edit.py's exits (`error: ...`) into PageError; the server's temporary copy of an upload is named by
    its file name."""
    try:
        yield
    except SystemExit as e:
        text = str(e.code).removeprefix("error: ")
        raise PageError(text.replace(str(path), Path(path).name) if path else text) from None


def read_upload(path):
    """(RGB image, alpha or None, frames) of an uploaded file, with edit.py's messages for what is not an image."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    if size > MAX_BYTES:
        raise PageError(f"{path.name} is too large ({size / 2**20:.0f} MB); the page takes images up to "
                        f"{MAX_BYTES // 2**20} MB (edit.py on the command line takes larger ones)")
    with page_errors(path):
        return edit.read_image(path)


def plan_rows(plan):
    """The plan as table rows: [action, subject, goal] per item."""
    return [list(row) for row in zip(plan["action"], plan["subject"], plan["goal"])]


ORDER_HEADERS = ["step", "sub-request", "region agent", "region", "area", "seconds", "error"]


def order_rows(steps):
    """The steps as the sequencing agent ordered them, with what the region agent found and any failure."""
    return [[r["step"], r["text"], r.get("agent", ""), r.get("region", ""),
             f"{r['area']:.0%}" if "area" in r else "", r["seconds"], r.get("error", "")] for r in steps]


def overlay(image, mask, alpha=0.55):
    """A region mask (float in [0, 1], the image's size) drawn over an RGB uint8 image in TINT, as a PIL image."""
    m = alpha * np.clip(mask, 0, 1)[..., None]
    return Image.fromarray((image * (1 - m) + TINT * m).round().astype(np.uint8))


class Page:
    """The page's work, without the page: choosing and caching planners, running one request at a time, writing
    its outputs. `submit` is what the Edit button calls."""

    def __init__(self, preset="cpu", adapter=None, editor=None, regions=None, root="runs", max_new_tokens=64,
                 out_dir=None):
        self.preset, self.adapter, self.root, self.max_new_tokens = preset, adapter, root, max_new_tokens
        self.chosen = edit.team(preset, editor, regions)
        # the memory plan: with GPU agents the planner is dropped before they load (edit_image), so none is kept
        self.keep = 0 if self.chosen["editor"] != "retouch" or self.chosen["regions"] != "cpu" else 2
        self.planners = {}  # "base" or "<adapter weights>@<mtime>" -> edit.load_planner's pair, oldest first
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="imageedit-page-"))
        if out_dir is None:  # the page's own outputs leave with it (Gradio's copies too: delete_cache in build)
            atexit.register(shutil.rmtree, self.out_dir, True)
        self.lock = threading.Lock()

    def default_choice(self):
        """(planner choice, adapter folder) the page opens with: --adapter, else the newest trained, else base."""
        if self.adapter:
            return "chosen adapter", str(self.adapter)
        return ("newest trained" if newest_adapter(self.root, self.preset) else "base"), ""

    def adapter_for(self, choice, folder=""):
        """The adapter folder of a planner choice (None for base), with edit.py's checks."""
        if choice == "base":
            return None
        if choice == "newest trained":
            with page_errors():  # a broken config.json under runs/, damaged weights: edit.py's messages
                found = newest_adapter(self.root, self.preset)
                if found is None:
                    sys.exit(f"error: no trained {self.preset} adapter under {self.root}/ yet: train one with "
                             "`make train`, or choose the base planner")
                edit.check_adapter(found)
            return found
        if choice != "chosen adapter":
            raise PageError(f"unknown planner choice {choice!r}; choose one of: {', '.join(PLANNERS)}")
        if not (folder or "").strip():
            raise PageError("name the adapter folder to use (a folder with adapter_config.json, as train.py saves)")
        with page_errors():
            return edit.checked_adapter(SimpleNamespace(adapter=folder.strip(), preset=self.preset, base=False))[0]

    def planner(self, adapter):
        """edit.load_planner's pair for `adapter`, loaded on first use; the page keeps the last two. An adapter
        saved anew (train.py writes into the same folder) is loaded anew."""
        weights = Path(adapter or "", "adapter_model.safetensors")
        key = f"{weights.resolve()}@{weights.stat().st_mtime_ns}" if adapter else "base"
        if key not in self.planners:
            if not self.keep:
                import agents
                agents.unload()  # the memory plan: the GPU agents of the last request leave before the planner loads
            while len(self.planners) >= max(self.keep, 1):
                self.planners.pop(next(iter(self.planners)))
            try:
                self.planners[key] = edit.load_planner(self.preset, adapter, self.max_new_tokens,
                                                       self.chosen["sequencer"] == "model", self.chosen["constrain"])
            except (NotImplementedError, RuntimeError, ValueError, OSError) as e:
                raise PageError(f"cannot load the {self.preset} planner"
                                + (f" with adapter {adapter}" if adapter else "") + f": {e}") from e
        return self.planners[key] if self.keep else self.planners.pop(key)

    def image(self, upload=None, builtin=None):
        """(RGB image, alpha, frames, name) of the upload, else of the chosen built-in photo."""
        if upload:
            rgb, alpha, frames = read_upload(upload)
            return rgb, alpha, frames, Path(upload).stem
        if builtin:
            with page_errors():
                if builtin not in image_names():
                    sys.exit(f"error: unknown built-in photo {builtin!r}")
                return builtin_image(builtin, 512), None, 1, builtin
        raise PageError("no image: upload a photo or pick a built-in one")

    def submit(self, upload, builtin, instruction, choice, folder=""):
        """Run one request. Returns {"before", "after" (PIL), "planner_output", "plan", "order" (table rows),
        "masks" [(PIL, caption)], "files" [edited PNG, trace JSON], "status"}; PageError for bad input or a
        request that could not run (its message says why, with the team's log when it ran)."""
        with self.lock, page_errors():  # an exit anywhere below (edit.py's checks) is a message, not a stop
            t0 = time.time()
            instruction = edit.check_instruction(instruction or "")
            rgb, alpha, frames, name = self.image(upload, builtin)
            adapter = self.adapter_for(choice, folder)
            description = edit.describe(rgb) if self.chosen["describe"] else None
            log, masks = [], []
            try:  # no reference kept here: with GPU agents, edit_image holds the planner's last one and drops it
                result, trace = edit.edit_image(rgb, instruction, self.planner(adapter), description,
                                                self.chosen["editor"], self.chosen["regions"],
                                                self.chosen["sequencer"], alpha, log=log.append, masks=masks)
            except edit.RequestFailed as e:
                raise PageError(f"{e}\n\n" + "\n".join(log)) from None
            folder_out = Path(tempfile.mkdtemp(dir=self.out_dir))
            out, trace_path = folder_out / f"{name}_edited.png", folder_out / f"{name}_edited.json"
            edit.save_atomic(result.save, out)
            seconds = {**trace["seconds"], "total": round(time.time() - t0, 2)}
            record = edit.make_record(trace, seconds, image=name, instruction=instruction, preset=self.preset,
                                      chosen=self.chosen, adapter=adapter, rgb=rgb, frames=frames, result=result,
                                      description=description, output=out.name)
            edit.save_atomic(lambda p: p.write_text(json.dumps(record, indent=1)), trace_path)
            steps = trace["steps"]
            failed = sum("error" in r for r in steps)
            status = "; ".join([f"Done in {seconds['total']:.1f} s: {len(steps)} step(s)"
                                + (f", {failed} failed" if failed else ""),
                                f"planner: {self.preset}, " + (f"adapter {adapter}" if adapter else "base model"),
                                f"order: {trace['sequencing']}"]
                               + ([f"only the first of {frames} frames edited"] if frames > 1 else []))
            return {"before": rgb, "after": result, "planner_output": trace["planner_output"],
                    "plan": plan_rows(trace["plan"]), "order": order_rows(steps),
                    "masks": [(overlay(small, mask), f"{step}. {steps[step - 1]['text']} | {steps[step - 1]['region']}")
                              for step, small, mask in masks],
                    "files": [str(out), str(trace_path)], "status": status}


def build(page):
    """The Gradio page around `page`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    import gradio as gr

    choice, folder = page.default_choice()
    with gr.Blocks(title="ImageEdit-R1: edit with an agent team", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:  # Gradio's copies of uploads and results: an hour
        gr.Markdown("## Edit a photo with an agent team\nThe planner decomposes the request, the sequencing agent "
                    "orders the edits, region agents find where each applies, and the editor changes the pixels.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Photo (any image file)", type="filepath", elem_id="upload")
                builtin = gr.Dropdown(image_names(), value=None, label="or a built-in photo", elem_id="builtin")
            with gr.Column():
                request = gr.Textbox(label="Request", placeholder="make it black and white and blur the background",
                                     lines=2, elem_id="request")
                planner = gr.Radio(PLANNERS, value=choice, label=f"Planner ({page.preset} preset)",
                                   elem_id="planner-choice")
                adapter = gr.Textbox(value=folder, label="Adapter folder (for a chosen adapter)",
                                     elem_id="adapter-folder")
                run = gr.Button("Edit", variant="primary", elem_id="run")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            before = gr.Image(label="Before", type="pil", format="png", interactive=False, elem_id="before")
            after = gr.Image(label="After", type="pil", format="png", interactive=False, elem_id="after")
        raw = gr.Textbox(label="Planner output (raw)", interactive=False, elem_id="raw")
        plan = gr.Dataframe(headers=["action", "subject", "goal"], label="Plan (the decomposition agent)",
                            interactive=False, elem_id="plan")
        order = gr.Dataframe(headers=ORDER_HEADERS, label="Order (the sequencing agent) and regions (the region "
                             "agents)", interactive=False, wrap=True, elem_id="order")
        masks = gr.Gallery(label="Each step's region, drawn over the image it was found on", columns=4, height=340,
                           fit_columns=False, object_fit="contain", elem_id="masks")
        files = gr.File(label="Download: the edited image (full resolution) and the trace", file_count="multiple",
                        interactive=False, elem_id="downloads")
        outputs = [status, before, after, raw, plan, order, masks, files]
        inputs = [upload, builtin, request, planner, adapter]
        run.click(lambda *a: respond(page, *a), inputs, outputs)
        request.submit(lambda *a: respond(page, *a), inputs, outputs)
        # an upload clears the built-in choice, and a built-in choice the upload
        upload.upload(lambda path: preview(page, path, None) if path else (gr.skip(),) * 3, [upload],
                      [status, before, builtin])
        builtin.change(lambda name: preview(page, None, name) if name else (gr.skip(),) * 3, [builtin],
                       [status, before, upload])
    return demo


def respond(page, upload, builtin, instruction, choice, folder):
    """The Edit button: [status, before, after, planner output, plan rows, order rows, masks, files]. Bad input and
    failures become a message on the page, never a stack trace (an unexpected one is printed on the server)."""
    cleared = [None, None, "", [], [], [], None]  # no result shown beside a message
    try:
        r = page.submit(upload, builtin, instruction, choice, folder)
    except PageError as e:
        return [error_text(e), *cleared]
    except Exception as e:  # noqa: BLE001 a failing agent must not take the page down
        traceback.print_exc()
        return [error_text(f"the request failed: {type(e).__name__}: {e}"), *cleared]
    return [r["status"], r["before"], r["after"], r["planner_output"], r["plan"], r["order"], r["masks"], r["files"]]


def preview(page, upload, name):
    """A photo as soon as it is chosen: [status, before, None for the other image input], or what is wrong with it."""
    try:
        return ["", page.image(upload, name)[0], None]
    except PageError as e:
        return [error_text(e), None, None]


def error_text(e):
    """An error as the page shows it: the message, and a log (after a blank line) as a code block."""
    head, _, log = str(e).partition("\n\n")
    return f"**error:** {head}" + (f"\n\n```\n{log}\n```" if log else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--adapter", help="the adapter the page opens with (default: the newest trained under runs/)")
    ap.add_argument("--preset", choices=PRESETS, help="default: the --adapter's, else cpu")
    ap.add_argument("--editor", choices=["retouch", "kontext", "pix2pix", "inpaint"],
                    help="the editing agent (default: kontext on gpu24, else the CPU retouch editor)")
    ap.add_argument("--regions", choices=["cpu", "grounding"], help="the region agents (default: grounding on "
                    "gpu24, else the CPU agents)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="a public Gradio link (off: this machine only)")
    args = ap.parse_args(argv)
    # edit.py's checks, before anything loads; without --adapter the page picks its own (default_choice)
    adapter, preset = edit.checked_adapter(SimpleNamespace(adapter=args.adapter, preset=args.preset,
                                                           base=not args.adapter))
    page = Page(preset, adapter, args.editor, args.regions)
    if page.keep:  # the planner the page opens with loads before it serves (with GPU agents: at each request)
        try:
            page.planner(page.adapter_for(*page.default_choice()))
        except PageError as e:
            sys.exit(f"error: {e}")
    demo = build(page)
    demo.queue(default_concurrency_limit=1)  # one request at a time: one planner, one set of agents
    print(f"the page: http://127.0.0.1:{args.port}/ (this machine only" + (", and a public link below)" if args.share
          else "; --share for a public link)") + "; Ctrl-C stops it")
    demo.launch(server_name="127.0.0.1", server_port=args.port, share=args.share, show_error=False,
                quiet=not args.share)  # Gradio prints the public link itself


if __name__ == "__main__":
    main()
