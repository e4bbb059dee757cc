"""Outputs: what a run writes and sends besides its checkpoints.

* :mod:`~kdrun.outputs.metrics`: classification metrics and calibration of a model's test logits;
* :mod:`~kdrun.outputs.report`: ``report.md``, ``report.json`` and ``figures/``;
* :mod:`~kdrun.outputs.compression`: teacher vs student size and CPU latency;
* :mod:`~kdrun.outputs.export`: the student as TorchScript / ONNX, and ``kdrun-export``;
* :mod:`~kdrun.outputs.trackers`: TensorBoard, MLflow and W&B (``logger=[...]``).

May import: :mod:`kdrun.train` (inference), :mod:`kdrun.data`, :mod:`kdrun.models`, :mod:`kdrun.schema` and
the frame modules. Never Hydra.
"""
