#!/usr/bin/env bash
# SphereFace (Liu et al., CVPR 2017): SphereFace-20, m 4, LFW accuracy (%) over 5 runs, as the official repo
# reports it (99.24 / 99.20 / 99.30 / 99.27 / 99.13). Data: CASIA-WebFace + lfw.bin (InsightFace
# faces_webface_112x112, see dataset=casia). 5 runs of 28k iterations at batch 512: about 5 x 4 GPU-hours.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/sphereface_casia/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=sphereface_casia seed=0,1,2,3,4 hydra.sweep.dir="$sweep" "$@" || status=1

$ml report "$sweep" || status=1
exit $status
