"""What MNIST is, as the stages need it: its four files, its classes and sizes."""

from __future__ import annotations

# The four files as the download stage stores them in `paths.raw` (decompressed, so
# their bytes and DVC hashes do not depend on the mirror).
RAW_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
NUM_CLASSES = 10  # digits 0-9
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000
