#!/usr/bin/env bash
# AM-Softmax (Wang et al., 2018) Table 2: LFW accuracy (%) by m at s 30, and the softmax, center loss,
# NormFace and A-Softmax rows under the same recipe (SphereFace-20, CASIA-WebFace, 30k iterations at batch
# 256). Data: CASIA-WebFace + lfw.bin (see dataset=casia). 10 runs of ~3 GPU-hours.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/amsoftmax_casia/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=amsoftmax_casia m=0.25,0.3,0.35,0.4,0.45,0.5 hydra.sweep.dir="$sweep" "$@" || status=1
$ml train -m experiment=amsoftmax_casia head=softmax,normface,sphereface hydra.sweep.dir="$sweep" "$@" || status=1
$ml train -m experiment=amsoftmax_casia head=softmax regularizer=center hydra.sweep.dir="$sweep" "$@" || status=1

$ml report "$sweep" || status=1
exit $status
