"""An example kdrun plugin package.

Installed (``pip install -e examples/kdrun-example-plugin``), it is found through the ``kdrun.plugins`` entry
point, and its three registrations become config options with no YAML and no flag:

    kdrun teacher=tinynet student=tinynet student.args.width=8 dataset=blobs loss=soft_ce_example

kdrun imports this module on every start (also for ``kdrun --help``), so it imports torch only inside the
registered functions: the option list needs just their names and signatures.

The same callables also work without registration, named by ``_target_`` from a config dir of your own
(see ``examples/my_conf``).
"""
from kdrun import register_dataset, register_loss, register_model


@register_model("tinynet", "Example plugin: conv(width)-ReLU-maxpool-linear")
def tinynet(num_classes: int, in_channels: int, image_size: int, width: int = 16):
    from kdrun_example_plugin.nets import TinyNet

    return TinyNet(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)


@register_dataset("blobs", "Example plugin: Gaussian blobs rendered as 8x8 images")
def blobs(n_train: int = 600, n_test: int = 200, num_classes: int = 4, seed: int = 0) -> dict:
    from kdrun_example_plugin.data import load_splits

    return load_splits(n_train=n_train, n_test=n_test, num_classes=num_classes, seed=seed)


@register_loss("soft_ce_example", "Example plugin: (1-alpha)·CE + alpha·T²·CE(p_t^T, p_s^T)")
def soft_ce_example(T: float = 4.0, alpha: float = 0.9):
    from kdrun_example_plugin.losses import SoftTargetCE

    return SoftTargetCE(T=T, alpha=alpha)
