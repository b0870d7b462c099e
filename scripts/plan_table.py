"""The README's plan table: `python -m vit_jax.plan --suggest` for models x TPU topologies.

  JAX_PLATFORMS=cpu PYTHONPATH=.:/path/to/libtpu/site python scripts/plan_table.py \
      --models ViT-B_16,ViT-L_16 --topologies v5e-16,v5p-64 --out plan_table.md [--scan]

Each (model, topology) runs the suggest search on configs/pretrain.py (batch 4096, 224 px,
ImageNet's 1000 classes) and appends one markdown row to --out as soon as it is done (a long run
keeps what it finished): memory per chip of the pick, fits, estimated step time, images/s, MFU
and the mesh / remat / accumulation the search picked, plus compile count and seconds. `--scan`
adds --config.model.scan=True for the families that have it (same maths, the layer loop compiled
once). `--teachers DeiT-B_16-distilled=ViT-B_16` plans a distillation run with a registered model as
the (shapes-only) teacher. Extra `--config.key=value` arguments go to every plan.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

HEADER = ('| model | topology | memory / chip | fits | step (ms) | img/s | MFU | mesh (data x fsdp '
          'x tensor) | remat | accum | compiles |\n|---|---|---|---|---|---|---|---|---|---|---|')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default='ViT-B_16,ViT-L_16,ViT-H_14')
  p.add_argument('--topologies', default='v5e-16,v5p-64,v5p-256')
  p.add_argument('--out', default='plan_table.md')
  p.add_argument('--scan', action='store_true')
  p.add_argument('--max_compiles', type=int, default=3)
  p.add_argument('--top', type=int, default=1)
  p.add_argument('--hlo_dir', default=None, help='keep the compiled modules (text, gzip) here')
  p.add_argument('--teachers', default='',
                 help='STUDENT=TEACHER,...: plan these students with a registered teacher (shapes)')
  args, config_args = p.parse_known_args(argv)

  from vit_jax.families import registry  # pylint: disable=g-import-not-at-top
  from vit_jax.plan import __main__ as plan_cli  # pylint: disable=g-import-not-at-top
  from vit_jax.plan import core, suggest, topologies  # pylint: disable=g-import-not-at-top

  teachers = dict(kv.split('=', 1) for kv in args.teachers.split(',') if kv)
  if not os.path.exists(args.out):
    with open(args.out, 'w') as f:
      f.write(HEADER + '\n')
  for model in args.models.split(','):
    extra = []
    if args.scan and 'scan' in registry.family_of(model).field_names():
      extra.append('--config.model.scan=True')
    config = plan_cli.load_config([f'--config=configs/pretrain.py:model={model}', *extra,
                                   *config_args])
    for name in args.topologies.split(','):
      topology = topologies.parse(name)
      t0 = time.time()
      plans = suggest.suggest(config, topology, max_compiles=args.max_compiles, top=args.top,
                              teacher_model=teachers.get(model), hlo_dir=args.hlo_dir,
                              log=lambda s: print(s, flush=True))
      seconds = time.time() - t0
      print(suggest.format_table(plans, topology), flush=True)
      fitting = [q for q in plans if q.fits]
      best = fitting[0] if fitting else (min(plans, key=lambda q: q.memory['total'])
                                         if plans else None)
      if best is None:
        row = f'| {model} | {name} | - | no | - | - | - | - | - | - | 0 |'
      else:
        m = best.mesh
        label = model + (' (scan)' if extra else '') + (
            f' + teacher {teachers[model]}' if model in teachers else '')
        row = (f'| {label} | {name} | '
               f'{best.memory["total"] / 2 ** 30:.1f} / {topology.chip.hbm_bytes / 2 ** 30:.1f} '
               f'GiB | {"yes" if best.fits else "no"} | {best.times["step"] * 1e3:.0f} | '
               f'{best.images_per_second:,.0f} | {100 * best.mfu:.0f}% | '
               f'{m["data"]} x {m["fsdp"]} x {m["tensor"]} | {"on" if best.remat else "off"} | '
               f'{best.accum_steps} | '
               f'{len(plans)} ({seconds / 60:.0f} min) |')
      with open(args.out, 'a') as f:
        f.write(row + '\n')
      print(row, flush=True)
  del core
  return 0


if __name__ == '__main__':
  sys.exit(main())
