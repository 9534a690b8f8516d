"""The support code of the pipeline: what the stage scripts and commands in `src/`
import. Each module owns one concern:

    params       params.yaml into frozen dataclasses; the `paths:` section
    errors       the one-line error a stage stops with, and its exit codes
    files        atomic writes; tensor files loaded without unpickling code
    mnist        what MNIST is: its files, classes and sizes
    process      how a stage process runs, stops, and holds its workspace lock
    locks        the one lock helper; one run of a stage per workspace
    gpus         one run per GPU: the GPUs a run claims
    settings     the device, and what every `auto` setting resolves to there
    model        ResNet-18 for MNIST, inference, and the saved model file
    augment      augmentation of training batches on the device: shifts, rotations,
                 scalings, Cutout
    optim        the optimiser and the learning-rate schedule
    ema          the moving average of the weights
    loop         the training loop: epochs of steps, validation, resume
    checkpoint   a run's resume state: what it holds, where it is kept
    identity     which run a checkpoint belongs to
    progress     progress bar, lines and time estimates while training
    distributed  several training processes on torch.distributed
"""
