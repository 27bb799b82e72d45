#!/usr/bin/env bash
# SphereFace (Liu et al., CVPR 2017): LFW accuracy (%) by m with the 64-layer net, and softmax, under the
# official recipe. Data: CASIA-WebFace + lfw.bin (see dataset=casia). 5 runs of SphereFace-64: ~5 x 12 GPU-hours.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/sphereface_casia_by_m/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=sphereface_casia backbone=sfnet64 m=1,2,3,4 hydra.sweep.dir="$sweep" "$@" || status=1
$ml train -m experiment=sphereface_casia backbone=sfnet64 head=softmax "~head.mode" hydra.sweep.dir="$sweep" "$@" || status=1

$ml report "$sweep" || status=1
exit $status
