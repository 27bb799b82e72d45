#!/usr/bin/env bash
# Center loss (Wen et al., ECCV 2016) on faces: softmax + center loss (lambda 0.003, alpha 0.5) and softmax
# alone, SphereFace-20 on CASIA-WebFace, LFW accuracy (%), 3 seeds (AM-Softmax Table 2's rows).
# Data: CASIA-WebFace + lfw.bin (see dataset=casia). 6 runs of ~3 GPU-hours.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/center_casia/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=center_casia seed=0,1,2 hydra.sweep.dir="$sweep" "$@" || status=1
$ml train -m experiment=amsoftmax_casia head=softmax seed=0,1,2 hydra.sweep.dir="$sweep" "$@" || status=1

$ml report "$sweep" || status=1
exit $status
