"""The Fine-tune widget: one click from exported corrections to a better model.

The work is :func:`napari_omniseg.corrections.finetune.finetune`: a copy of the
active checkpoint learns from the exported patches in the background; the result is
a NEW checkpoint in the registry, measured before and after on the held-out
patches.  Nothing changes which model is active until *Make active*; *Roll back*
returns to the model that was active before.  Cancel or a failure leaves the
registry exactly as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, Label, LineEdit, PushButton, SpinBox

from ._base import OmnisegWidget, background_threads, describe_error, log

if TYPE_CHECKING:
    import napari


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _patches(n: int) -> str:
    return f"{n} held-out patch" + ("" if n == 1 else "es")


def _advice(before, after, margin: float = 0.01, n_val: int | None = None) -> str:
    """A plain reading of the before/after Dice for the user."""
    if before is None or after is None:
        return "No held-out patches: export more corrections to measure the new model. "
    if n_val is not None and n_val < 3:
        return (f"Only {_patches(n_val)}: too few to tell whether the new model is better; "
                "export corrections from more regions before relying on this comparison. ")
    if after > before + margin:
        return "The new model is better on your held-out patches. "
    if after < before - margin:
        return "The new model is WORSE on your held-out patches: keep the current one. "
    return "No clear difference on your held-out patches (a few dozen patches are a small test). "


class FinetuneWidget(OmnisegWidget):
    """Fine-tune the active model on your exported corrections."""

    def __init__(self, viewer: napari.viewer.Viewer):  # this exact annotation is how napari finds the viewer argument
        super().__init__(viewer)
        self._data = LineEdit(label="Training folder", value="")
        self._data.native.setPlaceholderText("automatic: <project>/training")
        self._epochs = SpinBox(label="Epochs", value=3, min=1, max=200)
        self._crop = ComboBox(label="Crop (px)", choices=[64, 128, 256], value=128)
        self._freeze = CheckBox(text="Freeze the encoder (fast on CPU)", value=True)
        self._mix = CheckBox(text="Mix in the reference demo data", value=False)
        self._ref = LineEdit(label="Reference data", value=self._default_reference())
        self._device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")  # as Segment
        self._threads = SpinBox(label="CPU threads", value=background_threads(), min=1, max=256)
        self._resegment = CheckBox(text="Re-segment the current region after switching models", value=True)
        self._run = PushButton(text="Fine-tune")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = Label(value="")
        self._result = Label(value="")
        self._result.native.setWordWrap(True)
        self._result.native.setMinimumHeight(210)
        self._activate = PushButton(text="Make the new model active", enabled=False)
        self._rollback = PushButton(text="Roll back to the previous model", enabled=False)
        self.extend([self._data, self._epochs, self._crop, self._freeze, self._mix, self._ref, self._device, self._threads,
                     Container(widgets=[self._run, self._cancel], layout="horizontal", labels=False),
                     self._progress, self._result, self._activate, self._rollback, self._resegment, self.status])
        self._run.changed.connect(lambda: self.start())
        self._cancel.changed.connect(self.cancel)
        self._activate.changed.connect(lambda: self.activate())
        self._rollback.changed.connect(lambda: self.rollback())
        self.job = None
        self.result = None
        self.previous: Path | None = None
        self._had_previous = False
        self.config_overrides: dict = {}  #: extra FinetuneConfig fields (tests, scripts)

    @staticmethod
    def _default_reference() -> str:
        try:
            from .._sample_data import find_demo_dir

            return str(find_demo_dir())
        except FileNotFoundError:
            return ""

    def dataset(self) -> Path | None:
        if self._data.value.strip():
            return Path(self._data.value.strip()).expanduser()
        s = self.state.session
        return s.training_dir if s is not None else None

    # ------------------------------------------------------------------ run
    def start(self):
        from ..corrections.finetune import FinetuneConfig, finetune
        from ..model.registry import ModelRegistry
        from ._jobs import start_job

        st = self.state
        if st.busy:
            self.error(f"Wait for the {st.busy} to finish first.")
            return None
        data = self.dataset()
        if data is None or not (data / "manifest.csv").exists():
            self.error("No exported corrections found: export reviewed corrections first (Export widget).")
            return None
        ref = self._ref.value.strip() if self._mix.value else None
        if ref and not Path(ref).exists():
            self.error(f"Reference data {ref} not found; untick 'Mix in the reference demo data' or fix the path.")
            return None
        cfg = FinetuneConfig(epochs=int(self._epochs.value), crop=int(self._crop.value),
                             freeze_encoder=bool(self._freeze.value), reference=ref, device=self._device.value,
                             threads=int(self._threads.value), **self.config_overrides)
        reg = ModelRegistry()
        self.result = None
        self._activate.enabled = False

        def work(on_progress, should_stop):
            return finetune(data, reg, None, cfg, on_progress, should_stop)

        def done(res):
            self.result = res
            trained = [r for r in res.history.get("epochs", []) if r.get("epoch", 0) > 0]
            last = trained[-1] if trained else {}
            self._progress.value = (f"Finished {len(trained)} epoch(s) in {res.seconds:.0f} s"
                                    + (f", last loss {last['loss']:.3f}" if "loss" in last else ""))
            lines = [f"New model {res.path.stem}",
                     f"({res.n_train} training patches" + (f" + {res.n_reference} reference" if res.n_reference else "")
                     + f", {res.seconds:.0f} s)",
                     f"Mean Dice on {_patches(res.n_val)}: {_fmt(res.before_dice)} -> {_fmt(res.after_dice)}"]
            lines += [f"    {t.replace('_', ' ')}: {_fmt(v.get('before'))} -> {_fmt(v.get('after'))}"
                      for t, v in sorted(res.per_tissue.items())]
            if res.history.get("best_epoch") == 0:
                lines.append("No epoch beat the current model on your held-out patches, so the new version "
                             "keeps the current model's weights.")
            lines += [_advice(res.before_dice, res.after_dice, n_val=res.n_val).strip(),
                      "The active model is unchanged until you make the new one active."]
            self._result.value = "\n".join(lines)
            self._activate.enabled = True
            self.info(f"Fine-tuning done: {res.path.name}")
            st.changed.emit("model")

        def failed(e):
            from ..training.loop import TrainingCancelled

            self._progress.value = ""
            if isinstance(e, TrainingCancelled):
                self.info("Fine-tuning cancelled: no checkpoint was written and the active model is unchanged.")
            else:
                log.exception("fine-tuning failed", exc_info=e)
                self.error(f"Fine-tuning failed: {describe_error(e)}. No checkpoint was written; the active model "
                           "is unchanged.")

        def fin():
            st.busy = ""
            self._run.enabled = True
            self._cancel.enabled = False

        st.busy = "fine-tuning"
        self._run.enabled = False
        self._cancel.enabled = True
        self._progress.value = "Starting..."
        self.job = start_job("Fine-tuning", work, on_progress=self._on_progress, on_done=done, on_error=failed,
                             on_finally=fin)
        return self.job

    def _on_progress(self, ev: dict) -> None:
        ph = ev.get("phase")
        if ph == "train":
            self._progress.value = (f"Epoch {ev['epoch']}/{ev['epochs']}, step {ev['step']}/{ev['steps']}, "
                                    f"loss {ev['loss']:.3f}")
        elif ph == "epoch":
            vd = ev.get("val_mean_dice")
            self._progress.value = (f"Epoch {ev['epoch']}/{ev['epochs']} done: loss {ev['loss']:.3f}"
                                    + (f", val Dice {vd:.3f}" if vd is not None else ""))
        elif ph == "evaluate":
            self._progress.value = f"Measuring the {ev['which']} model on {ev['n']} held-out patches..."
        elif ph == "load":
            self._progress.value = ev.get("message", "")
        elif ph == "calibrate":
            self._progress.value = f"Choosing each tissue's decision threshold on {ev['samples']} patches..."

    def cancel(self, *_):
        if self.job is not None and self.job.running:
            self.job.cancel()
            self._progress.value = "Cancelling..."

    # ------------------------------------------------------------------ switch models
    def activate(self):
        from ..corrections.finetune import activate
        from ..model.registry import ModelRegistry

        if self.result is None:
            self.error("Fine-tune first.")
            return None
        reg = ModelRegistry()
        try:
            self.previous = activate(reg, self.result.path)
        except Exception as e:  # noqa: BLE001
            self.error(f"Could not activate {self.result.path.name}: {describe_error(e)}")
            return None
        self._had_previous = True
        self._activate.enabled = False
        self._rollback.enabled = True
        self.info(f"{self.result.path.name} is now the active model.")
        self.state.changed.emit("model")
        return self._resegment_now()

    def rollback(self):
        from ..corrections.finetune import rollback
        from ..model.registry import ModelRegistry

        if not self._had_previous:
            self.error("Nothing to roll back.")
            return None
        try:
            rollback(ModelRegistry(), self.previous)
        except Exception as e:  # noqa: BLE001
            self.error(f"Roll back failed: {describe_error(e)}")
            return None
        self._rollback.enabled = False
        self._activate.enabled = self.result is not None
        self._had_previous = False
        name = self.previous.name if self.previous else "the shipped model"
        self.info(f"Rolled back: {name} is active again.")
        self.state.changed.emit("model")
        return self._resegment_now()

    def _resegment_now(self):
        st = self.state
        seg = st.segment_widget
        if not self._resegment.value or seg is None or st.region is None or not st.tissues:
            return None
        from .segment import ACTIVE, SCOPE_FOV

        s = st.session
        if s is not None:
            # never replace what the pathologist painted: committed corrections on view or
            # uncommitted painting keep the layers as they are, with a word on what to do
            shown = [n for n in st.tissues if n in s.regions]
            painted = s.uncommitted(shown)
            committed = [n for n in shown if n not in painted and s._committed(n, s.regions[n])
                         and s.edited_pixels(n)]
            if painted or committed:
                which = ", ".join(painted or committed)
                why = ("has uncommitted painting" if painted else "shows your committed corrections")
                self.info(f"The model is switched, but the region was not re-segmented: {which} {why}. "
                          + ("Commit or discard it, then " if painted else "They stay in the project; ")
                          + "segment the region again in the Segment widget to see the new model's prediction.")
                return None
        seg.refresh_models()
        seg._ckpt.value = ACTIVE
        return seg.run(scope=SCOPE_FOV, region=st.region, tissues=st.tissues)
