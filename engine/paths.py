"""Every file and folder a run writes, named in one place.

    OUTPUT_DIR/
      config.yaml, config_eval.yaml, ...   the settings of each mode's last run
      results.md, results.json, report.html
      CLASS/model.pdparams                 the checkpoint (best.pdparams: --select_best_on_test)
      CLASS/train_state.pdparams           for --resume; CLASS/status.json marks it finished
      CLASS/metrics.json, CLASS/train_log.json
      CLASS/infer/                         --mode infer: pictures, masks/, scores.csv
      report/CLASS/index.html              the class report and its figures
      inference/CLASS/                     export_model.py: the deployable model
      inference/CLASS/infer/               infer.py's default output for that model
      visualdl/CLASS/                      --visualdl logs
      logs/CLASS.log                       tools/train_all.py
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RunPaths:
    output_dir: str

    def file(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def config_yaml(self, mode: str) -> str:
        return self.file("config.yaml" if mode == "train" else f"config_{mode}.yaml")

    def class_dir(self, cls: str) -> str:
        return os.path.join(self.output_dir, cls)

    def checkpoint(self, cls: str, best: bool = False) -> str:
        return os.path.join(self.class_dir(cls), "best.pdparams" if best else "model.pdparams")

    def train_state(self, cls: str) -> str:
        return os.path.join(self.class_dir(cls), "train_state.pdparams")

    def status(self, cls: str) -> str:
        return os.path.join(self.class_dir(cls), "status.json")

    def metrics(self, cls: str) -> str:
        return os.path.join(self.class_dir(cls), "metrics.json")

    def train_log(self, cls: str) -> str:
        return os.path.join(self.class_dir(cls), "train_log.json")

    def infer_dir(self, cls: str) -> str:
        return os.path.join(self.class_dir(cls), "infer")

    def report_dir(self, cls: str) -> str:
        return os.path.join(self.output_dir, "report", cls)

    def export_dir(self, cls: str) -> str:
        return os.path.join(self.output_dir, "inference", cls)

    def visualdl_dir(self, cls: str) -> str:
        return os.path.join(self.output_dir, "visualdl", cls)

    def log_dir(self) -> str:
        return os.path.join(self.output_dir, "logs")

    def exported_classes(self) -> list[str]:
        """The classes with an exported model (inference/CLASS/deploy.json)."""
        folder = os.path.join(self.output_dir, "inference")
        names = os.listdir(folder) if os.path.isdir(folder) else []
        return sorted(n for n in names if os.path.isfile(os.path.join(folder, n, "deploy.json")))

    def trained_classes(self) -> list[str]:
        """The classes with a trained checkpoint (CLASS/model.pdparams)."""
        names = os.listdir(self.output_dir) if os.path.isdir(self.output_dir) else []
        return sorted(n for n in names if os.path.isfile(self.checkpoint(n)))


def no_model_for_class(output_dir: str, cls: str) -> str | None:
    """Why the default exported model of `cls` (OUTPUT_DIR/inference/CLS) cannot be used,
    naming the classes that exist; None when it is there."""
    paths = RunPaths(output_dir)
    if os.path.isfile(os.path.join(paths.export_dir(cls), "deploy.json")):
        return None
    exported, trained = paths.exported_classes(), paths.trained_classes()
    if cls in trained:
        return (f"--cls {cls}: trained but not exported ({paths.export_dir(cls)} missing): "
                f"python export_model.py --output_dir {output_dir} --cls {cls}")
    found = ([f"exported: {', '.join(exported)}"] if exported else []) + \
        ([f"trained: {', '.join(trained)}"] if trained else [])
    if not found:
        return (f"{paths.export_dir(cls)}: no exported model (and no trained class in {output_dir}/): "
                f"train, then export a model first (python export_model.py)")
    return f"--cls {cls}: no such class in {output_dir}/ ({'; '.join(found)})"


def default_infer_dir(model_dir: str) -> str:
    """infer.py's output for an exported model, when --output_dir is not given: inside the
    model's own folder, so two models (or classes) never share one scores.csv."""
    return os.path.join(model_dir, "infer")
