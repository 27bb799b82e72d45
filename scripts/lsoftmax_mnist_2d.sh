#!/usr/bin/env bash
# L-Softmax (Liu et al., ICML 2016): the 2-D MNIST feature figure, test accuracy (%) by m, 3 seeds each,
# then the feature plots side by side. Data: MNIST (downloaded on first use). 12 runs of 64 epochs.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/lsoftmax_mnist_2d/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=lsoftmax_mnist_2d m=1,2,3,4 seed=0,1,2 hydra.sweep.dir="$sweep" "$@" || status=1
$ml plot "$sweep" || status=1

$ml report "$sweep" || status=1
exit $status
