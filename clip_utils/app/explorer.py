"""Try your own photos interactively: an ipywidgets explorer for the notebooks.

    from clip_utils.app.explorer import photo_explorer
    photo_explorer(lab, ["flowers102", "cub200"])                      # every registered method
    photo_explorer(lab, ["flowers102"], methods=["zeroshot"], photo_dir="my_photo")

The last line of a cell shows it: upload one or more photos or pick one from `photo_dir`,
choose the dataset, the methods and the number of classes, and each photo appears beside
its top-k bar chart per method (`plots.plot_photo_predictions`, the figures of the
notebooks' photo cells), under the table `predict --method all` prints. A method with no
checkpoint for the dataset is greyed out, with the command that trains it.

Uploads go through the same loading as files (`photos.open_photo`: EXIF rotation, CMYK,
16-bit, huge images); what cannot be read is a message in the widget, never a traceback.
Each (dataset, method) classifier is loaded once and kept (LoRA's holds its own model
copy), and each photo's class ranking is kept too, so moving the top-k slider or going
back to a dataset runs no model.

The explorer draws its first result (the first photo of `photo_dir`) when it is built, and
its results are plain PNG outputs in an `Output` widget, so a notebook executed headless
(nbclient saves widget state) keeps them; a viewer without a kernel may still show only
the static cells. `explorer.results` and `explorer.figures` hold what is shown, for tests.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import ipywidgets as widgets
from PIL import Image

from clip_utils import config, registry
from clip_utils.app.photos import (
    PhotoError,
    checkpoint_missing,
    classifier_for,
    format_comparison,
    list_photos,
    load_photo,
    open_photo,
    top_classes,
)
from clip_utils.errors import InvalidValue, UserError
from clip_utils.figures.predictions import plot_photo_predictions
from clip_utils.lab import Lab
from clip_utils.model.heads import ClipClassifier

UPLOADED = "<uploaded>"  # the photo menu's entry for the last upload (no file path looks like it)
MAX_TOP_K = 20  # a longer bar chart is unreadable


def _png_output(fig, name: str) -> dict:
    # A saved PNG rather than `display(fig)` inside the Output: the same bytes in a live
    # kernel, under nbclient and in tests, and they stay in the saved widget state.
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"), "text/plain": name}}


def _text_output(text: str, error: bool = False) -> dict:
    style = "color:#b2182b" if error else ""
    return {"output_type": "display_data", "metadata": {},
            "data": {"text/html": f'<pre style="{style}">{html.escape(text)}</pre>', "text/plain": text}}


class PhotoExplorer(widgets.VBox):
    """The photo explorer widget (see the module docstring); build it with `photo_explorer`.

    Attributes:
        upload, photo, dataset, method_boxes, top_k, notes, output: its controls and views.
        results: per photo shown, `{"photo": name, "methods": {method: {"top_k": [...]} or
            {"error": ...}}}` or `{"photo": name, "error": message}` (as `compare_photos`).
        figures: the matplotlib figures shown, in order.
        reasons: `{method: why it is disabled}` for the dataset shown.
    """

    def __init__(self, lab: Lab, datasets: Sequence[str], methods: Sequence[str] | None = None,
                 photo_dir: str | Path = "my_photo", top_k: int = config.TOP_K,
                 prompt_set: str = config.PHOTO_PROMPT_SET) -> None:
        if not datasets:
            raise InvalidValue("photo_explorer needs at least one dataset")
        names = list(dict.fromkeys(registry.get(m).name for m in (methods or [m.name for m in registry.methods()])))
        try:
            files = list_photos(photo_dir)
        except PhotoError:  # no folder: uploads still work
            files = []
        upload = widgets.FileUpload(accept="image/*", multiple=True, description="Upload photos")
        photo = widgets.Dropdown(options=[(p.name, str(p)) for p in files], description="Photo")
        dataset = widgets.Dropdown(options=list(datasets), description="Dataset")
        boxes = {name: widgets.Checkbox(value=True, description=registry.get(name).label, indent=False) for name in names}
        slider = widgets.IntSlider(value=min(max(top_k, 1), MAX_TOP_K), min=1, max=MAX_TOP_K, description="Top-k",
                                   continuous_update=False)  # one prediction per release, not per pixel dragged
        notes, output = widgets.HTML(), widgets.Output()
        super().__init__([widgets.HBox([upload, photo]), widgets.HBox([dataset, slider]),
                          widgets.HBox(list(boxes.values())), notes, output])
        self.lab, self.prompt_set = lab, prompt_set
        self.upload, self.photo, self.dataset, self.method_boxes, self.top_k = upload, photo, dataset, boxes, slider
        self.notes, self.output = notes, output
        self.results: list[dict] = []
        self.figures: list = []
        self.reasons: dict[str, str] = {}
        self._files = [(p.name, str(p)) for p in files]
        self._uploads: list[tuple[str, bytes]] = []
        self._shown: list[tuple[tuple, str, Image.Image | PhotoError]] = []  # (cache key, name, image or why not)
        self._classifiers: dict[tuple[str, str], ClipClassifier] = {}
        self._failed: dict[tuple[str, str], str] = {}  # checkpoints that exist but cannot be loaded
        self._rankings: dict[tuple, list[dict]] = {}
        self._quiet = False
        self._update_methods()
        self._open_selected()
        self.refresh()
        upload.observe(self._handler(self._uploaded), "value")
        photo.observe(self._handler(self._open_selected, self.refresh), "value")
        dataset.observe(self._handler(self._update_methods, self.refresh), "value")
        slider.observe(self._handler(self.refresh), "value")
        for box in boxes.values():
            box.observe(self._handler(self.refresh), "value")

    # ------------------------------------------------------------------ events

    def _handler(self, *actions: Callable[[], None]) -> Callable[[dict], None]:
        def handle(change: dict) -> None:
            if self._quiet:  # the explorer's own bulk updates render once, at their end
                return
            try:
                for action in actions:
                    action()
            except Exception as err:  # noqa: BLE001 - a callback's traceback only reaches the kernel log
                self.output.outputs = (_text_output(f"error: {type(err).__name__}: {err}", error=True),)
        return handle

    @contextmanager
    def _holding(self) -> Iterator[None]:
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def _uploaded(self) -> None:
        files = self.upload.value
        if not files:  # our own reset below
            return
        self._uploads = [(f["name"], bytes(f["content"])) for f in files]
        label = self._uploads[0][0] if len(self._uploads) == 1 else f"{len(self._uploads)} photos"
        with self._holding():
            # Cleared so the same file can be uploaded again (an equal value fires no change),
            # and the photo's bytes do not stay in the widget state.
            self.upload.value = ()
            self.photo.options = [(f"uploaded: {label}", UPLOADED), *self._files]
            self.photo.value = UPLOADED
        self._open_selected()
        self.refresh()

    def _open_selected(self) -> None:
        """Decode the photos the menu selects, once per selection (not per dataset or top-k)."""
        if self.photo.value == UPLOADED:
            sources = [(("upload", name, hashlib.blake2b(data, digest_size=16).hexdigest()), name, io.BytesIO(data))
                       for name, data in self._uploads]
        elif self.photo.value is not None:
            path = Path(self.photo.value)
            sources = [(("file", str(path), path.stat().st_mtime_ns if path.exists() else 0), path.name, path)]
        else:
            sources = []
        self._shown = []
        for key, name, source in sources:
            try:
                image = load_photo(source) if isinstance(source, Path) else open_photo(source, name)
            except PhotoError as err:
                image = err
            self._shown.append((key, name, image))

    def _update_methods(self) -> None:
        """Grey out the methods the dataset has no usable checkpoint for, saying why."""
        dataset = self.dataset.value
        self.reasons = {}
        with self._holding():
            for name, box in self.method_boxes.items():
                reason = self._failed.get((dataset, name)) or checkpoint_missing(self.lab, dataset, name)
                if reason is not None:
                    self.reasons[name] = reason
                    box.value = False
                elif box.disabled:  # available again (another dataset): on by default
                    box.value = True
                box.disabled, box.tooltip = reason is not None, reason or ""
        self.notes.value = "<br>".join(f'<span style="color:#777">{html.escape(registry.get(name).label)} unavailable: '
                                       f"{html.escape(why)}</span>" for name, why in self.reasons.items())

    # ------------------------------------------------------------------ predictions

    def _ranking(self, key: tuple, image: Image.Image, dataset: str, method: str) -> list[dict]:
        """Every class of `dataset` for one photo and method, most likely first (kept)."""
        cache = (key, dataset, method, self.prompt_set)
        if cache not in self._rankings:
            if (dataset, method) not in self._classifiers:
                self._classifiers[dataset, method] = classifier_for(self.lab, dataset, method, self.prompt_set)
            names = self.lab.class_names(dataset)
            self._rankings[cache] = top_classes(self.lab, self._classifiers[dataset, method], image, names, len(names))
        return self._rankings[cache]

    def refresh(self) -> None:
        """Predict the selected photos with the chosen methods and show them (or why not)."""
        dataset, k = self.dataset.value, self.top_k.value
        chosen = [name for name, box in self.method_boxes.items() if box.value and not box.disabled]
        results, figures, outputs = [], [], []
        if not self._shown:
            outputs.append(_text_output("no photo yet: upload one, or add photos to the folder and rebuild this"))
        if not chosen:
            outputs.append(_text_output("choose at least one method"))
        if self._shown and any((dataset, m) not in self._classifiers for m in chosen):
            self.output.outputs = (_text_output("loading the classifiers ..."),)  # LoRA's model copy takes seconds
        failed = False
        for key, name, image in self._shown if chosen else []:
            if isinstance(image, PhotoError):
                results.append({"photo": name, "error": str(image)})
                outputs.append(_text_output(f"{name}: {image}", error=True))
                continue
            entry: dict = {"photo": name, "methods": {}}
            for method in chosen:
                try:
                    entry["methods"][method] = {"top_k": self._ranking(key, image, dataset, method)[:k]}
                except UserError as err:  # damaged, mismatched, or removed since
                    self._failed[dataset, method] = str(err)
                    entry["methods"][method] = {"error": str(err)}
                    failed = True
            results.append(entry)
            outputs.append(_text_output(f"{dataset}: {format_comparison([entry])}"))
            for method, predicted in entry["methods"].items():
                if "top_k" in predicted:
                    title = f"{name} ({dataset}, {registry.get(method).label})"
                    figures.append(plot_photo_predictions(image, predicted["top_k"], title))
                    outputs.append(_png_output(figures[-1], title))
        if failed:
            self._update_methods()
        self.results, self.figures = results, figures
        self.output.outputs = tuple(outputs)


def photo_explorer(lab: Lab, datasets: Sequence[str], methods: Sequence[str] | None = None,
                   photo_dir: str | Path = "my_photo", top_k: int = config.TOP_K,
                   prompt_set: str = config.PHOTO_PROMPT_SET) -> PhotoExplorer:
    """The photo explorer widget, showing its first result already; a cell's last line displays it.

    Args:
        lab: the run context; its model and text classifiers are shared, not reloaded.
        datasets: the datasets to offer (the first is shown first).
        methods: the methods to offer (None: every registered method); those with
            no checkpoint for the chosen dataset are disabled, with the reason.
        photo_dir: the folder whose photos the menu offers (the first is shown first).
        top_k: the slider's starting value.
        prompt_set: zero-shot prompt set.
    """
    return PhotoExplorer(lab, datasets, methods, photo_dir, top_k, prompt_set)
