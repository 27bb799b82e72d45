#!/usr/bin/env bash
# L-Softmax (Liu et al., ICML 2016): CIFAR-10 (no augmentation) test error (%) by m (softmax = m 1), 3 seeds.
# Data: CIFAR-10 (downloaded on first use). 12 runs of 77 epochs (30k iterations).
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/lsoftmax_cifar10/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=lsoftmax_cifar10 m=1,2,3,4 seed=0,1,2 hydra.sweep.dir="$sweep" "$@" || status=1

$ml report "$sweep" || status=1
exit $status
