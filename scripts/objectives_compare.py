"""The README's objective comparisons on this machine, as one resumable command:

    python scripts/objectives_compare.py [--out runs/objectives] [--steps N] [--only pretrain|vpt]

1. Pre-training of the quickstart's plain ViT (configs/quickstart.py:model=ViT-Mini_7: Fashion-MNIST,
   2,100 steps of 256, Adam) three ways at the same budget: supervised (that recipe), masked patch
   prediction and MAE (labels ignored). Each encoder is then
     - fine-tuned on digits with the quickstart's transfer recipe (configs/quickstart_digits.py),
       against the same model trained on digits from scratch (the quickstart's baseline);
     - evaluated few-shot (`vit_jax.fewshot`, ridge on pre-logits, 1/5/10/25 shots x 3 seeds) on
       Fashion-MNIST's and digits' test splits, against a random initialisation (`--random_init`).
2. Prompt tuning on digits from the supervised model: shallow and deep VPT against the head alone
   (num_tokens 0) and full fine-tuning: test accuracy, trained parameters, checkpoint bytes.
Every stage resumes (or is skipped when finished); the table is printed and written to
OUT/results.md and OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # trained_parameters reads checkpoints in this process
PY = sys.executable
# The self-supervised objectives need a plain ViT: the quickstart's recipe with its earlier model.
QUICK = 'configs/quickstart.py:model=ViT-Mini_7'
DIGITS = 'configs/quickstart_digits.py:model=ViT-Mini_7'
# MAE's decoder for a width-128 encoder: the paper's ratio (512 for ViT-B's 768), 2 blocks.
MAE = ['--config.objective.name=mae', '--config.mae.decoder_width=96',
       '--config.mae.decoder_depth=2', '--config.mae.decoder_heads=4',
       '--config.mae.decoder_mlp_dim=384']
PRETRAIN = {'supervised': [], 'mpp': ['--config.objective.name=mpp'], 'mae': MAE}
# Prompt tuning: (name, prompt block, learning rates tried: a frozen backbone wants larger steps).
VPT = [('head only', ['--config.prompt.num_tokens=0'], (0.1, 1.0)),
       ('shallow VPT (8 tokens)', ['--config.prompt.num_tokens=8'], (0.1, 1.0)),
       ('deep VPT (8 tokens x 6 blocks)', ['--config.prompt.num_tokens=8',
                                           '--config.prompt.deep=True'], (0.1, 1.0))]


def run(workdir: str, config: str, *args: str) -> dict:
  """`vit_jax.main` into workdir (resumes; skipped when its result is already there)."""
  done = os.path.join(workdir, 'result.json')
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  t0 = time.time()
  cmd = [PY, '-m', 'vit_jax.main', f'--workdir={workdir}', f'--config={config}', *args,
         '--config.progress=False']
  print('>>', ' '.join(cmd[2:]), flush=True)
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f'{workdir} failed:\n{out.stderr[-3000:]}')
  line = [l for l in out.stdout.splitlines() if l.startswith('result: ')][-1]
  result = dict(json.loads(line[len('result: '):]), wall_seconds=round(time.time() - t0, 1))
  with open(done, 'w') as f:
    json.dump(result, f)
  return result


def fewshot(checkpoint: str, dataset: str, out: str, random_init: bool = False) -> dict:
  """{shots: mean accuracy} of `vit_jax.fewshot` (cached in `out`)."""
  if not os.path.exists(out):
    cmd = [PY, '-m', 'vit_jax.fewshot', '--checkpoint', checkpoint, '--dataset', dataset,
           '--shots', '1,5,10,25', '--seeds', '3', '--json_out', out]
    if random_init:
      cmd.append('--random_init')
    print('>>', ' '.join(cmd[2:]), flush=True)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
      raise SystemExit(f'fewshot {checkpoint} {dataset} failed:\n{res.stderr[-3000:]}')
  with open(out) as f:
    data = json.load(f)
  return {int(k): float(sum(v) / len(v)) for k, v in data['accuracy'].items()}


def checkpoint_bytes(workdir: str) -> int:
  """Bytes of the run's last checkpoint directory (the training state and metadata)."""
  root = os.path.join(workdir, 'checkpoints')
  step = max(int(d) for d in os.listdir(root) if d.isdigit())
  total = 0
  for base, _, files in os.walk(os.path.join(root, str(step))):
    total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
  return total


def trained_parameters(workdir: str) -> int:
  from vit_jax.checkpoints.manager import load_params  # pylint: disable=import-outside-toplevel
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  return params_lib.count(load_params(workdir)[0])


def pretraining(out: str, steps: list[str]) -> list[dict]:
  rows = []
  scratch = run(os.path.join(out, 'digits_scratch'), DIGITS)
  for name, args in PRETRAIN.items():
    work = os.path.join(out, name)
    pre = run(work, QUICK, *steps, *args)
    ft = run(os.path.join(out, f'digits_from_{name}'), f'{DIGITS},pretrained={work}')
    row = {'encoder': name, 'pretraining': {k: pre.get(k) for k in (
        'eval_top1', 'eval_loss', 'eval_accuracy', 'seconds', 'wall_seconds')},
           'digits_finetuned': ft['eval_top1'], 'digits_scratch': scratch['eval_top1']}
    for dataset in ('fashion_mnist', 'digits'):
      row[f'fewshot_{dataset}'] = fewshot(work, dataset,
                                          os.path.join(out, f'fs_{name}_{dataset}.json'))
    rows.append(row)
  random = {'encoder': 'random init', 'digits_scratch': scratch['eval_top1']}
  for dataset in ('fashion_mnist', 'digits'):
    random[f'fewshot_{dataset}'] = fewshot(os.path.join(out, 'supervised'), dataset,
                                           os.path.join(out, f'fs_random_{dataset}.json'), True)
  return rows + [random]


def prompt_tuning(out: str) -> list[dict]:
  backbone = os.path.join(out, 'supervised')
  rows = []
  full = os.path.join(out, 'digits_from_supervised')
  rows.append({'method': 'full fine-tuning', 'lr': 0.1,
               'top1': run(full, f'{DIGITS},pretrained={backbone}')['eval_top1'],
               'trained': trained_parameters(full), 'bytes': checkpoint_bytes(full)})
  for name, args, rates in VPT:
    tried = []
    for lr in rates:
      work = os.path.join(out, f'vpt_{name.split()[0]}_{name.split()[1]}_lr{lr}')
      res = run(work, f'{DIGITS},pretrained={backbone}', '--config.objective.name=prompt', *args,
                f'--config.base_lr={lr}')
      tried.append({'method': name, 'lr': lr, 'top1': res['eval_top1'],
                    'trained': trained_parameters(work), 'bytes': checkpoint_bytes(work)})
    best = max(tried, key=lambda r: r['top1'])
    rows.append({**best, 'tried': {r['lr']: r['top1'] for r in tried}})
  return rows


def markdown(pre: list[dict], vpt: list[dict]) -> str:
  pct = lambda v: '—' if v is None else f'{100 * v:.2f}%'
  lines = []
  if pre:
    lines += ['| encoder (Fashion-MNIST pre-training) | its own metric | digits fine-tuned | '
              'few-shot Fashion-MNIST 1 / 5 / 10 / 25 | few-shot digits 1 / 5 / 10 / 25 |',
              '|---|---|---:|---|---|']
    for r in pre:
      p = r.get('pretraining') or {}
      own = (f'top-1 {pct(p["eval_top1"])}' if p.get('eval_top1') is not None else
             f'loss {p["eval_loss"]:.3f}' + (f', colour acc. {pct(p["eval_accuracy"])}'
                                             if p.get('eval_accuracy') is not None else '')
             if p else f'(digits from scratch: {pct(r["digits_scratch"])})')
      fs = lambda d: ' / '.join(pct(r[f'fewshot_{d}'][k]) for k in (1, 5, 10, 25))
      lines.append(f'| {r["encoder"]} | {own} | {pct(r.get("digits_finetuned"))} | '
                   f'{fs("fashion_mnist")} | {fs("digits")} |')
  if vpt:
    lines += ['', '| digits from the supervised model | test top-1 | trained parameters | '
              'checkpoint | learning rates tried |', '|---|---:|---:|---:|---|']
    for r in vpt:
      tried = ', '.join(f'{lr}: {pct(v)}'
                        for lr, v in (r.get('tried') or {r['lr']: r['top1']}).items())
      lines.append(f'| {r["method"]} | {pct(r["top1"])} | {r["trained"]:,} | '
                   f'{r["bytes"] / 1024:,.0f} KiB | {tried} |')
  return '\n'.join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', default=os.path.join(ROOT, 'runs', 'objectives'))
  ap.add_argument('--steps', type=int, default=None,
                  help="pre-training steps (default: the quickstart's)")
  ap.add_argument('--only', choices=('pretrain', 'vpt'), default=None)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  steps = [f'--config.total_steps={args.steps}'] if args.steps else []
  pre = pretraining(args.out, steps) if args.only in (None, 'pretrain') else []
  vpt = prompt_tuning(args.out) if args.only in (None, 'vpt') else []
  table = markdown(pre, vpt)
  print(table)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'pretraining': pre, 'prompt_tuning': vpt}, f, indent=1)


if __name__ == '__main__':
  main()
