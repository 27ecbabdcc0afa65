"""Try your own photos interactively: an ipywidgets explorer for the notebooks.

    from clip_utils.app.explorer import photo_explorer
    photo_explorer(lab, ["flowers102", "cub200"])                      # every registered method
    photo_explorer(lab, ["flowers102"], methods=["zeroshot"], photo_dir="my_photo")

The last line of a cell shows it: upload one or more photos or pick one from `photo_dir`,
choose the dataset, the methods and the number of classes. Each photo is one row: the photo
once, then one compact top-k chart per chosen method side by side (a fixed height per class,
so top-1 is one short bar); the demo mark, when `CLIP_DEMO` is set, once above the view. A
method with no checkpoint for the dataset is greyed out; hovering its name gives the reason
and the command that trains it, with the notebook's own model, data root and results folder.

Uploads go through the same loading as files (`photos.open_photo`: EXIF rotation, CMYK,
16-bit, huge images); what cannot be read is a message in the widget, never a traceback.
What costs is done once and kept: each (dataset, method) classifier (LoRA's holds its own
model copy), each photo's ranking of every class under each method, and each method's chart
image, drawn once with the slider's most classes and cut to any top-k. Moving the top-k slider or
ticking a method box therefore runs no model and draws no chart: it pastes kept images
(`figures.predictions.photo_row`), a few tens of milliseconds for two photos and three
methods. While it works (loading a classifier, a first prediction) the controls' row says so.

The controls need a live kernel. A notebook saved by JupyterLab keeps no widget state, so
after a reload, in the saved file and in viewers the controls are gone; the explorer
therefore also leaves a static image of its view in the cell's output (`_ipython_display_`),
which the live widget hides while it is there (a style rule matched on a marker inside the
PNG). `explorer.results`, `explorer.images` and `explorer.view` hold what is shown, for tests.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import ipywidgets as widgets
from PIL import Image, PngImagePlugin

from clip_utils import config, registry
from clip_utils.app.photos import (
    PhotoError,
    checkpoint_missing,
    classifier_for,
    list_photos,
    load_photo,
    open_photo,
    top_classes,
)
from clip_utils.errors import InvalidValue, UserError
from clip_utils.figures import predictions
from clip_utils.lab import Lab
from clip_utils.model.heads import ClipClassifier

UPLOADED = "<uploaded>"  # the photo menu's entry for the last upload (no file path looks like it)
MAX_TOP_K = 20  # a longer bar chart is unreadable
SNAPSHOT_KEY = "Comment"  # the PNG text chunk that carries an explorer's marker
CONTROLS_TEXT = "photo explorer controls: they need a running kernel (run this cell); its view is below"


def _png(image: Image.Image, marker: str | None = None) -> str:
    """`image` as base64 PNG; fast compression (the view is redrawn at every change)."""
    info = None
    if marker is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(SNAPSHOT_KEY, marker)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1, pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_output(image: Image.Image, name: str) -> dict:
    # PNG outputs rather than `display(...)` inside the Output: the same bytes in a live
    # kernel, under nbclient and in tests.
    return {"output_type": "display_data", "metadata": {}, "data": {"image/png": _png(image), "text/plain": name}}


def _text_output(text: str, error: bool = False) -> dict:
    style = "color:#b2182b" if error else ""
    return {"output_type": "display_data", "metadata": {},
            "data": {"text/html": f'<pre style="{style}">{html.escape(text)}</pre>', "text/plain": text}}


def marker_fragments(marker: str) -> list[str]:
    """What the marker's bytes look like inside a base64 PNG, one way per byte alignment.

    Base64 turns 3 bytes into 4 characters, so the marker's text reads differently at each
    position modulo 3; the bytes from its first 3-aligned offset on are one of these.
    """
    data = marker.encode("ascii")
    out = []
    for shift in range(3):
        chunk = data[shift:]
        out.append(base64.b64encode(chunk[: len(chunk) // 3 * 3]).decode("ascii"))
    return out


def hiding_style(marker: str) -> str:
    """A style rule that hides the static image carrying `marker` (JupyterLab draws an image
    output as `<img src="data:image/png;base64,...">`); in an HTML widget it only applies
    while the widget is drawn, that is while the live explorer shows the same view."""
    imgs = [f'img[src*="{fragment}"]' for fragment in marker_fragments(marker)]
    outputs = [f".jp-OutputArea-child:has({img})" for img in imgs]
    return f"<style>{', '.join(imgs + outputs)} {{ display: none !important; }}</style>"


def _offered(lab: Lab, datasets: Sequence[str]) -> list[str]:
    """The methods worth a box: the reference, and every method with a finished run for one of
    the datasets (one never trained here would only add a greyed-out box)."""
    return [m.name for m in registry.methods()
            if m.reference or any(checkpoint_missing(lab, lab.resolve(dataset), m.name) is None for dataset in datasets)]


class PhotoExplorer(widgets.VBox):
    """The photo explorer widget (see the module docstring); build it with `photo_explorer`.

    Attributes:
        upload, photo, dataset, method_boxes, top_k, status, notes, output: its controls and views.
        results: per photo shown, `{"photo": name, "methods": {method: {"top_k": [...]} or
            {"error": ...}}}` or `{"photo": name, "error": message}` (as `compare_photos`).
        images: one PIL image per photo shown (the photo and its charts).
        view: the outputs shown (a PNG per photo, messages as text).
        reasons: `{method: why it is disabled}` for the dataset shown.
    """

    def __init__(self, lab: Lab, datasets: Sequence[str], methods: Sequence[str] | None = None,
                 photo_dir: str | Path = "my_photo", top_k: int = config.TOP_K,
                 prompt_set: str = config.PHOTO_PROMPT_SET) -> None:
        if not datasets:
            raise InvalidValue("photo_explorer needs at least one dataset")
        names = list(dict.fromkeys(registry.get(m).name for m in (methods or _offered(lab, datasets))))
        try:
            files = list_photos(photo_dir)
        except PhotoError:  # no folder: uploads still work
            files = []
        upload = widgets.FileUpload(accept="image/*", multiple=True, description="Upload photos")
        photo = widgets.Dropdown(options=[(p.name, str(p)) for p in files], description="Photo")
        # labelled by results folder (`flowers102-coop` under Zhou et al.'s split), valued by the name given
        dataset = widgets.Dropdown(options=[(lab.resolve(d).folder, d) for d in datasets], description="Dataset")
        boxes = {name: widgets.Checkbox(value=True, description=html.escape(registry.get(name).label), indent=False,
                                        description_allow_html=True, layout=widgets.Layout(width="auto"))
                 for name in names}
        slider = widgets.IntSlider(value=min(max(top_k, 1), MAX_TOP_K), min=1, max=MAX_TOP_K, description="Top-k",
                                   continuous_update=False)  # one update per release, not per pixel dragged
        status, notes, output = widgets.HTML(), widgets.HTML(), widgets.Output()
        self._marker = f"clip-explorer-snapshot-{uuid.uuid4().hex}"
        style = widgets.HTML(hiding_style(self._marker), layout=widgets.Layout(display="none"))
        super().__init__([widgets.HBox([upload, photo]), widgets.HBox([dataset, slider, status]),
                          widgets.HBox(list(boxes.values()), layout=widgets.Layout(flex_flow="row wrap")),
                          notes, output, style])
        self.lab, self.prompt_set = lab, prompt_set
        self.upload, self.photo, self.dataset, self.method_boxes, self.top_k = upload, photo, dataset, boxes, slider
        self.status, self.notes, self.output = status, notes, output
        self.results: list[dict] = []
        self.images: list[Image.Image] = []
        self.view: tuple[dict, ...] = ()
        self.reasons: dict[str, str] = {}
        self._files = [(p.name, str(p)) for p in files]
        self._uploads: list[tuple[str, bytes]] = []
        self._shown: list[tuple[tuple, str, Image.Image | PhotoError]] = []  # (cache key, name, image or why not)
        self._classifiers: dict[tuple[str, str], ClipClassifier] = {}
        self._failed: dict[tuple[str, str], str] = {}  # checkpoints that exist but cannot be loaded
        self._rankings: dict[tuple, list[dict]] = {}
        self._charts: dict[tuple, Image.Image] = {}  # (photo, dataset, method, prompt set): MAX_TOP_K rows
        self._panels: dict[tuple, Image.Image] = {}  # (photo, dataset): title and photo
        self._snapshot = None  # the display handle of the static image, once displayed
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

    @property
    def photos(self) -> list[tuple[str, Image.Image | PhotoError]]:
        """The photos selected: `(name, decoded image or why it cannot be read)`."""
        return [(name, image) for _, name, image in self._shown]

    # ------------------------------------------------------------------ display

    def _ipython_display_(self) -> None:
        """The controls, then a static image of the view for when they cannot be drawn."""
        from IPython.display import display

        controls = self._repr_mimebundle_()
        # What a viewer without widgets (GitHub) prints instead of the controls: not a repr.
        controls["text/plain"] = CONTROLS_TEXT
        display(controls, raw=True)
        self._snapshot = display(self.snapshot(), raw=True, display_id=True)

    def snapshot(self) -> dict:
        """The view as one static output: every photo's row in one PNG (or the messages)."""
        texts = [o["data"]["text/plain"] for o in self.view]
        if not self.images:
            return {"text/plain": "\n".join(texts) or "photo explorer"}
        width = max(image.width for image in self.images)
        whole = Image.new("RGB", (width, sum(image.height for image in self.images)), "white")
        y = 0
        for image in self.images:
            whole.paste(image, (0, y))
            y += image.height
        return {"image/png": _png(whole, self._marker), "text/plain": "\n".join(texts)}

    # ------------------------------------------------------------------ events

    def _handler(self, *actions: Callable[[], None]) -> Callable[[dict], None]:
        def handle(change: dict) -> None:
            if self._quiet:  # the explorer's own bulk updates render once, at their end
                return
            try:
                for action in actions:
                    action()
            except Exception as err:  # noqa: BLE001 - a callback's traceback only reaches the kernel log
                self.status.value = ""
                self._show((_text_output(f"error: {type(err).__name__}: {err}", error=True),))
        return handle

    @contextmanager
    def _holding(self) -> Iterator[None]:
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    @contextmanager
    def _busy(self, what: str) -> Iterator[None]:
        """Say in the controls' row that the explorer is working (sent to the page at once)."""
        self.status.value = f'<span style="color:#555">&#x23F3; {html.escape(what)}</span>'
        try:
            yield
        finally:
            self.status.value = ""

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
        """Grey out the methods the dataset has no usable checkpoint for, saying why on hover."""
        dataset = self.dataset.value
        self.reasons = {}
        with self._holding():
            for name, box in self.method_boxes.items():
                reason = self._failed.get((dataset, name)) or checkpoint_missing(self.lab, self.lab.resolve(dataset), name, paths=True)
                if reason is not None:
                    self.reasons[name] = reason
                    box.value = False
                elif box.disabled:  # available again (another dataset): on by default
                    box.value = True
                label = html.escape(registry.get(name).label)
                # ipywidgets titles a described checkbox with its description, so `tooltip` alone
                # never shows: the label itself carries the reason as its title.
                box.description = label if reason is None else f'<span title="{html.escape(reason)}">{label}</span>'
                box.disabled, box.tooltip = reason is not None, reason or ""
        self.notes.value = "<br>".join(f'<span style="color:#777">{html.escape(registry.get(name).label)} unavailable: '
                                       f"{html.escape(why)}</span>" for name, why in self.reasons.items())

    # ------------------------------------------------------------------ predictions

    def _ranking(self, key: tuple, image: Image.Image, dataset: str, method: str) -> list[dict]:
        """Every class of `dataset` for one photo and method, most likely first (kept): any
        top-k is a slice of it."""
        cache = (key, dataset, method, self.prompt_set)
        if cache not in self._rankings:
            if (dataset, method) not in self._classifiers:
                with self._busy(f"loading {registry.get(method).label} for {dataset} ..."):
                    self._classifiers[dataset, method] = classifier_for(self.lab, dataset, method, self.prompt_set)
            names = self.lab.class_names(dataset)
            with self._busy(f"predicting with {registry.get(method).label} ..."):
                self._rankings[cache] = top_classes(self.lab, self._classifiers[dataset, method], image, names,
                                                    len(names))
        return self._rankings[cache]

    def _chart(self, key: tuple, dataset: str, method: str, ranking: list[dict]) -> Image.Image:
        """The method's chart for this photo, drawn once with the slider's most classes (kept):
        any top-k is its first rows, cut out by `predictions.photo_row`."""
        cache = (key, dataset, method, self.prompt_set)
        if cache not in self._charts:
            with self._busy("drawing ..."):
                self._charts[cache] = predictions.chart_image(registry.get(method).label, ranking[:MAX_TOP_K])
        return self._charts[cache]

    def _row(self, key: tuple, name: str, image: Image.Image, dataset: str, charts: list[Image.Image], rows: int,
             first: bool) -> Image.Image:
        if (key, dataset) not in self._panels:
            self._panels[key, dataset] = predictions.photo_panel(image, f"{name} ({dataset})")
        return predictions.photo_row(self._panels[key, dataset], charts, rows, banner=first and predictions.is_demo())

    def refresh(self) -> None:
        """Show the selected photos under the chosen methods (or why not), from what is kept."""
        dataset, k = self.dataset.value, self.top_k.value
        chosen = [name for name, box in self.method_boxes.items() if box.value and not box.disabled]
        results, images, outputs = [], [], []
        if not self._shown:
            outputs.append(_text_output("no photo yet: upload one, or add photos to the folder and rebuild this"))
        if not chosen:
            outputs.append(_text_output("choose at least one method"))
        failed = False
        for key, name, image in self._shown if chosen else []:
            if isinstance(image, PhotoError):  # its message names the photo
                results.append({"photo": name, "error": str(image)})
                outputs.append(_text_output(str(image), error=True))
                continue
            entry: dict = {"photo": name, "methods": {}}
            charts = []
            for method in chosen:
                try:
                    ranking = self._ranking(key, image, dataset, method)
                except UserError as err:  # damaged, mismatched, or removed since
                    self._failed[dataset, method] = str(err)
                    entry["methods"][method] = {"error": str(err)}
                    failed = True
                    continue
                entry["methods"][method] = {"top_k": ranking[:k]}
                charts.append(self._chart(key, dataset, method, ranking))
            results.append(entry)
            if charts:
                rows = min(k, len(self.lab.class_names(dataset)))
                images.append(self._row(key, name, image, dataset, charts, rows, first=not images))
                outputs.append(_png_output(images[-1], f"{name} ({dataset})"))
        if failed:
            self._update_methods()
        self.results, self.images = results, images
        self._show(tuple(outputs))

    def _show(self, outputs: tuple[dict, ...]) -> None:
        self.view = outputs
        self.output.outputs = outputs
        if self._snapshot is not None:
            # Frontends that apply display updates sent from a widget callback (nbclient, VS
            # Code) keep the last view; JupyterLab keeps the one drawn when the cell ran.
            self._snapshot.update(self.snapshot(), raw=True)


def photo_explorer(lab: Lab, datasets: Sequence[str], methods: Sequence[str] | None = None,
                   photo_dir: str | Path = "my_photo", top_k: int = config.TOP_K,
                   prompt_set: str = config.PHOTO_PROMPT_SET) -> PhotoExplorer:
    """The photo explorer widget, showing its first result already; a cell's last line displays it.

    Args:
        lab: the run context; its model and text classifiers are shared, not reloaded.
        datasets: the datasets to offer (the first is shown first).
        methods: the methods to offer (None: zero-shot and every method with a finished run for
            one of the datasets); those with no checkpoint for the chosen dataset are disabled,
            with the reason.
        photo_dir: the folder whose photos the menu offers (the first is shown first).
        top_k: the slider's starting value.
        prompt_set: zero-shot prompt set.
    """
    return PhotoExplorer(lab, datasets, methods, photo_dir, top_k, prompt_set)
