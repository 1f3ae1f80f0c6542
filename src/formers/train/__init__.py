"""Training and evaluation of any registered model: `formers train` / `formers eval`.

    from formers.train import TrainConfig, train, load_trained
    summary = train(TrainConfig("swin_demo", dataset="digits", epochs=40, batch_size=32, lr=2e-3,
                                 img_size=16, out="runs/demo"))
    model = load_trained("runs/demo/best.safetensors")   # architecture and sizes read from the file

Needs the `train` extra (tqdm, matplotlib, scikit-learn, numpy); each is imported only
where it is used.
"""
from .common import TrainingDiverged, load_trained, read_weights_metadata
from .trainer import TrainConfig, train
from formers.tasks import run_eval   # noqa: E402  (the model's task evaluates; classification's below)
from formers.tasks.classify import evaluate   # noqa: E402

__all__ = ["TrainConfig", "train", "evaluate", "run_eval", "load_trained", "read_weights_metadata",
           "TrainingDiverged"]
