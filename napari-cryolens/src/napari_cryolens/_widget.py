"""The dock widget: pick particles in a Points layer, see CryoLens reconstructions over them.

Reconstruction runs in a napari worker thread, a chunk of picks per request; each chunk's
layers are added on the GUI thread as it arrives. Errors become napari notifications (the
server's own message; an unreachable server is one line, not a traceback).
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np
from napari.layers import Image, Points
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_cryolens import core
from napari_cryolens._jobs import Chunk, Job, run_job
from napari_cryolens._layers import paste, place, rotated

MODES = {"server": "CryoLens server", "local": "Local engine (PyTorch)"}
POSES = {False: "identity (canonical)", True: "predicted"}
#: A Points layer made while the viewer showed 2-D layers is 2-D: listed by napari, not here.
NO_PICKS_LAYER = ("CryoLens: choose a 3-D (z, y, x) Points layer of picks first; 2-D and 4-D "
                  "ones are not offered")


class CryoLensWidget(QWidget):
    """Server URL or local engine, tomogram and picks choosers, options, and the actions."""

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.settings = core.Settings.load()
        self._backend: core.ServerBackend | core.LocalBackend | None = None
        self._backend_key: tuple | None = None
        self.worker = None
        self._job: Job | None = None
        #: picks asked for during a run, in order (a dict: queueing thousands stays linear)
        self._pending: dict[int, None] = {}
        self._watched: Points | None = None
        self._fills: dict[int, float] = {}
        #: points layer name -> {pick index: embedding}
        self.embeddings: dict[str, dict[int, np.ndarray]] = {}
        #: seconds from each pick's request (a click, a button) to its layer, newest last
        self.latencies: list[float] = []
        #: messages shown to the user, newest last (also napari notifications)
        self.messages: list[str] = []
        #: chunks whose layers are still to be added, one pick a turn of the event loop
        self._showing: deque[Chunk] = deque()
        self._show_timer = QTimer(self)
        self._show_timer.setSingleShot(True)
        self._show_timer.setInterval(0)
        self._show_timer.timeout.connect(self._show_next)
        self._build()
        self.refresh_layers()
        napari_viewer.layers.events.inserted.connect(self._layer_inserted)
        for event in (napari_viewer.layers.events.removed, napari_viewer.layers.events.moved):
            event.connect(self.refresh_layers)
        for layer in napari_viewer.layers:
            layer.events.name.connect(self.refresh_layers)

    # -- layout --------------------------------------------------------------------------
    def _build(self) -> None:
        s = self.settings
        self.mode = QComboBox()
        for key, text in MODES.items():
            self.mode.addItem(text, key)
        self.mode.setCurrentIndex(list(MODES).index(s.mode) if s.mode in MODES else 0)
        self.url = QLineEdit(s.url)
        self.url.setPlaceholderText(core.DEFAULT_URL)
        self.checkpoint = QLineEdit(s.checkpoint)
        self.check_button = QPushButton("Check")
        self.check_button.setToolTip("Ask the server (or load the local model) and say which")
        url_row = QHBoxLayout()
        url_row.addWidget(self.url)
        url_row.addWidget(self.check_button)
        self.tomogram = QComboBox()
        self.picks = QComboBox()
        self.pose = QComboBox()
        for key, text in POSES.items():
            self.pose.addItem(text, key)
        self.pose.setCurrentIndex(1 if s.use_predicted_pose else 0)
        self.segments = QCheckBox("affinity and free segments as their own layers")
        self.segments.setChecked(s.segments)
        self.final_convolution = QCheckBox("final convolution")
        self.final_convolution.setChecked(s.final_convolution)
        self.colour = QCheckBox("colour picks by embedding (2-D PCA)")
        self.colour.setChecked(s.colour_by_embedding)
        self.live = QCheckBox("reconstruct each pick as it is added or moved")
        self.combined = QCheckBox("all picks in one layer (fast for many picks)")
        self.combined.setToolTip("Paste every reconstruction into one tomogram-sized layer, "
                                 "'cryolens all picks', instead of a layer per pick")
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 256)
        self.batch_size.setValue(s.batch_size)
        self.selected_button = QPushButton("Reconstruct selected")
        self.all_button = QPushButton("Reconstruct all")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Run on", self.mode)
        form.addRow("Server URL", url_row)
        form.addRow("Checkpoint", self.checkpoint)
        form.addRow("Tomogram", self.tomogram)
        form.addRow("Picks", self.picks)
        form.addRow("Pose", self.pose)
        form.addRow("", self.segments)
        form.addRow("", self.final_convolution)
        form.addRow("", self.colour)
        form.addRow("", self.live)
        form.addRow("", self.combined)
        form.addRow("Picks per request", self.batch_size)
        buttons = QHBoxLayout()
        for button in (self.selected_button, self.all_button, self.cancel_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.mode.currentIndexChanged.connect(self._mode_changed)
        for edit in (self.url, self.checkpoint):
            edit.editingFinished.connect(self._save_settings)
        for box in (self.segments, self.final_convolution, self.colour):
            box.toggled.connect(self._save_settings)
        self.pose.currentIndexChanged.connect(self._save_settings)
        self.batch_size.valueChanged.connect(self._save_settings)
        self.picks.currentIndexChanged.connect(self._watch_picks)
        self.live.toggled.connect(self._watch_picks)
        self.colour.toggled.connect(self._recolour)
        self.check_button.clicked.connect(self.check)
        self.selected_button.clicked.connect(self.reconstruct_selected)
        self.all_button.clicked.connect(self.reconstruct_all)
        self.cancel_button.clicked.connect(self.cancel)
        self._mode_changed()

    def _mode_changed(self, *_) -> None:
        server = self.mode.currentData() == "server"
        self.url.setEnabled(server)
        self.checkpoint.setEnabled(not server)
        self._save_settings()

    def _save_settings(self, *_) -> None:
        self.settings = core.Settings(
            url=self.url.text().strip() or core.DEFAULT_URL, mode=self.mode.currentData(),
            checkpoint=self.checkpoint.text().strip() or core.DEFAULT_CHECKPOINT,
            use_predicted_pose=bool(self.pose.currentData()),
            segments=self.segments.isChecked(),
            final_convolution=self.final_convolution.isChecked(),
            colour_by_embedding=self.colour.isChecked(), batch_size=self.batch_size.value())
        self.settings.save()

    def refresh_layers(self, *_) -> None:
        """Offer the 3-D Image layers as tomograms and the 3-D Points layers as picks (each
        item holds its layer, so that a chosen layer stays chosen when it is renamed)."""
        for combo, kind in ((self.tomogram, Image), (self.picks, Points)):
            current = combo.currentData()
            layers = [layer for layer in self.viewer.layers
                      if isinstance(layer, kind) and layer.ndim == 3
                      and not layer.name.startswith("cryolens ")]
            combo.blockSignals(True)
            combo.clear()
            for layer in layers:
                combo.addItem(layer.name, layer)
            chosen = [i for i, layer in enumerate(layers) if layer is current]
            if chosen:
                combo.setCurrentIndex(chosen[0])
            combo.blockSignals(False)
        self._watch_picks()

    def _layer_inserted(self, event) -> None:
        event.value.events.name.connect(self.refresh_layers)  # a rename: refresh the names
        self.refresh_layers()

    # -- live picking --------------------------------------------------------------------
    def _watch_picks(self, *_) -> None:
        layer = self._chosen(self.picks, Points) if self.live.isChecked() else None
        if layer is self._watched:
            return
        if self._watched is not None:
            self._watched.events.data.disconnect(self._picks_changed)
        self._watched = layer
        if layer is not None:
            layer.events.data.connect(self._picks_changed)

    def _picks_changed(self, event) -> None:
        action = str(getattr(event, "action", ""))
        indices = getattr(event, "data_indices", ())
        if action.endswith(("added", "changed")) and indices:
            count = len(self._watched.data) if self._watched is not None else 0
            self.reconstruct([int(i) % count for i in indices if count])

    # -- actions -------------------------------------------------------------------------
    def reconstruct_selected(self) -> None:
        layer = self._chosen(self.picks, Points)
        if layer is None:
            return self._say(NO_PICKS_LAYER, error=True)
        selected = sorted(layer.selected_data)
        if not selected:
            return self._say("CryoLens: select one or more picks first (select mode, click)",
                             error=True)
        self.reconstruct(selected)

    def reconstruct_all(self) -> None:
        layer = self._chosen(self.picks, Points)
        if layer is None:
            return self._say(NO_PICKS_LAYER, error=True)
        self.reconstruct(list(range(len(layer.data))))

    def reconstruct(self, indices: list[int]) -> None:
        """Reconstruct these picks of the chosen Points layer (queued if a run is going on)."""
        if self.busy:
            self._pending.update(dict.fromkeys(indices))
            return
        job = self._job_for(indices)
        if job is None:
            return
        if not job.indices:
            return self._say(f"CryoLens: no picks to reconstruct in {job.points_name!r}",
                             error=True)
        backend = self._checked_backend()
        if backend is None:
            return
        from napari.qt.threading import create_worker

        self._job = job
        self.progress.setRange(0, len(job.indices))
        self.progress.setValue(0)
        self._set_running(True)
        self.status.setText(f"reconstructing {len(job.indices)} pick(s)...")
        self.worker = create_worker(run_job, backend, job, _start_thread=False)
        self.worker.yielded.connect(self._on_chunk)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    def cancel(self) -> None:
        """Stop: no request after the one in flight, and no more layers; those shown stay."""
        self._pending.clear()
        self._showing.clear()
        if self._job is not None:
            self._job.cancelled.set()
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("cancelling...")
        elif self._job is not None:
            self._done()

    def check(self) -> None:
        from napari.qt.threading import create_worker

        backend = self._checked_backend()
        if backend is None:
            return
        worker = create_worker(lambda b: b.describe(), backend, _start_thread=False)
        worker.returned.connect(lambda text: self._say(f"CryoLens: {text}"))
        worker.errored.connect(self._on_error)
        worker.start()

    @property
    def busy(self) -> bool:
        """A run is going on: its worker, or its layers still being added."""
        return self.worker is not None or bool(self._showing)

    # -- helpers -------------------------------------------------------------------------
    def backend(self) -> core.ServerBackend | core.LocalBackend:
        """The backend the controls name (kept while they name the same one)."""
        self._save_settings()
        s = self.settings
        key = (s.mode, s.url if s.mode == "server" else s.checkpoint)
        if key != self._backend_key or self._backend is None:
            if self._backend is not None:
                self._backend.close()
            self._backend = (core.ServerBackend(s.url) if s.mode == "server"
                             else core.LocalBackend(s.checkpoint))
            self._backend_key = key
        return self._backend

    def _checked_backend(self) -> core.ServerBackend | core.LocalBackend | None:
        """:meth:`backend`, or None once the user is told why there is none (a URL the client
        refuses, such as one without http://; the client not installed)."""
        try:
            return self.backend()
        except Exception as exc:  # noqa: BLE001 - shown to the user, not raised in a Qt slot
            self._on_error(exc)
            return None

    def _chosen(self, combo: QComboBox, kind):
        """The layer chosen in ``combo``, while it is in the viewer."""
        layer = combo.currentData()
        return layer if isinstance(layer, kind) and layer in self.viewer.layers else None

    def _job_for(self, indices: list[int]) -> Job | None:
        tomogram = self._chosen(self.tomogram, Image)
        picks = self._chosen(self.picks, Points)
        if tomogram is None or picks is None:
            self._say("CryoLens: choose a 3-D tomogram (Image) and picks (Points) layer",
                      error=True)
            return None
        for layer in (tomogram, picks):
            if rotated(layer):
                self._say(f"CryoLens: layer {layer.name!r} is rotated, sheared or has an affine "
                          "transform; boxes are cut and placed by scale and translate only, so "
                          "set it to the identity first", error=True)
                return None
        data = tomogram.data[0] if tomogram.multiscale else tomogram.data
        indices = [i for i in indices if 0 <= i < len(picks.data)]
        voxels = core.pick_voxels(picks.data[indices], picks.scale, picks.translate,
                                  tomogram.scale, tomogram.translate)
        centres = core.centre_voxels(voxels)
        inside = core.inside(centres, data.shape)
        if not inside.all():
            outside = [i for i, keep in zip(indices, inside, strict=True) if not keep]
            self._say(f"CryoLens: {len(outside)} pick(s) of {picks.name!r} lie outside the "
                      f"tomogram {tomogram.name!r} and were skipped: {core.listed(outside)}",
                      error=True)
            indices = [i for i, keep in zip(indices, inside, strict=True) if keep]
            centres = centres[inside]
            if not indices:
                return None
        return Job(indices=indices, data=data, fill=self._fills.get(id(data)), fill_key=id(data),
                   centres=centres, scale=np.asarray(tomogram.scale),
                   translate=np.asarray(tomogram.translate), points_name=picks.name,
                   options=core.Options(use_predicted_pose=bool(self.pose.currentData()),
                                        segments=self.segments.isChecked(),
                                        final_convolution=self.final_convolution.isChecked(),
                                        embeddings=self.colour.isChecked()),
                   batch_size=self.batch_size.value(), combined=self.combined.isChecked(),
                   shape=tuple(data.shape))

    def _set_running(self, running: bool) -> None:
        self.cancel_button.setEnabled(running)
        self.check_button.setEnabled(not running)

    def _say(self, message: str, error: bool = False) -> None:
        self.messages.append(message)
        self.status.setText(message)
        (show_error if error else show_info)(message)

    # -- results (GUI thread) ------------------------------------------------------------
    def _on_chunk(self, chunk: Chunk | str | None) -> None:
        job = self._job
        if chunk is None:  # the worker waiting for the viewer (see run_job)
            return
        if isinstance(chunk, str):  # a failure the worker described
            self._say(chunk, error=True)
            return
        if job is None:
            return
        self._fills = {job.fill_key: job.fill}  # computed by the worker before any chunk
        if job.cancelled.is_set():  # the answer to the request in flight at Cancel
            return
        if not job.combined:
            self._showing.append(chunk)
            self._show_timer.start()
            return
        try:
            paste(self.viewer, job, chunk)
            self._count(job, chunk, range(len(chunk.indices)))
            self._recolour()
        finally:
            job.ahead.release()  # shown (or failed): the worker may fetch one more

    def _show_next(self) -> None:
        """Add the next pick's layers. napari takes ~0.2 s to add an Image layer: a pick per
        turn of the event loop keeps the viewer responsive while a chunk is shown."""
        job = self._job
        if not self._showing or job is None:
            return
        chunk = self._showing[0]
        row = chunk.shown
        chunk.shown += 1
        try:
            for layer in chunk.layers[row]:
                place(self.viewer, layer)
            self._count(job, chunk, [row])
            if chunk.shown == len(chunk.indices):
                self._recolour()
        finally:
            if chunk.shown == len(chunk.indices):
                self._showing.popleft()
                job.ahead.release()  # shown (or failed): the worker may fetch one more
            if self._showing:
                self._show_timer.start()
            elif self.worker is None:
                self._done()

    def _count(self, job: Job, chunk: Chunk, rows) -> None:
        """These rows of a chunk are shown: their embeddings, latencies and progress."""
        if "embedding" in chunk.arrays:
            stored = self.embeddings.setdefault(job.points_name, {})
            for row in rows:
                stored[chunk.indices[row]] = np.asarray(chunk.arrays["embedding"][row])
        now = time.perf_counter()
        self.latencies.extend([now - job.started] * len(rows))
        self.progress.setValue(self.progress.value() + len(rows))
        self.status.setText(f"{self.progress.value()} of {self.progress.maximum()} picks done")

    def _recolour(self, *_) -> None:
        layer = self._chosen(self.picks, Points)
        stored = self.embeddings.get(layer.name, {}) if layer is not None else {}
        if not self.colour.isChecked() or layer is None or len(stored) < 2:
            return
        known = sorted(i for i in stored if i < len(layer.data))
        colours = np.tile([0.6, 0.6, 0.6, 1.0], (len(layer.data), 1))
        colours[known] = core.pca_colours(np.stack([stored[i] for i in known]))
        layer.face_color = colours

    def _on_error(self, exc: BaseException) -> None:
        where = self.settings.url if self.settings.mode == "server" else "local engine"
        self._say(core.describe_error(exc, where), error=True)

    def _on_finished(self) -> None:
        self.worker = None
        if not self._showing:  # else the last pick shown ends the run
            self._done()

    def _done(self) -> None:
        self._job = None
        self._set_running(False)
        if self._pending:
            pending, self._pending = list(self._pending), {}
            self.reconstruct(pending)

