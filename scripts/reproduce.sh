#!/usr/bin/env bash
# Reproduce one experiment's tables: every sweep its YAML lists (configs/experiment/<name>.yaml, `reproduce:`),
# then the report (and figures where the experiment asks for them) in outputs/sweeps/<name>/<date_time>.
#   scripts/reproduce.sh --list                      # experiments, job counts, paper tables
#   scripts/reproduce.sh amsoftmax_casia trainer.device=cuda trainer.device_index=1 dataset.root=/data/casia
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -euo pipefail
exec ${MARGINLAB:-marginlab} reproduce "$@"
