"""Data: the dataset contract, the built-in sources, image folders and streaming, device-resident splits and
batches with their view ids.

* :mod:`~kdrun.data.sources`: where images come from: the registered built-in datasets (digits, Fashion-MNIST,
  MNIST, CIFAR, fake, image folders) and :class:`~kdrun.data.sources.LazyImages` for folders too large for memory;
* :mod:`~kdrun.data.images`: image folders on disk: class folders labelled by name across splits, links followed
  once, every PIL mode decoded to 8-bit RGB with its own scaling;
* :mod:`~kdrun.data.splits`: a dataset config becomes its splits (:func:`~kdrun.data.splits.call_dataset`: a
  registered name or a user's ``_target_``, checked against the contract);
* :mod:`~kdrun.data.dataset`: :class:`~kdrun.data.dataset.Data`, the splits as tensors on the run's device, seeded
  batches (:class:`~kdrun.data.dataset.Batch`) and the batched crop/flip views.

May import: :mod:`kdrun.schema`, :mod:`kdrun.registry`, :mod:`kdrun.errors`. Never Hydra.
"""
