"""`python -m vit_jax.plan`: topology names, the HLO collective reader, and plans on 8 fake CPU
devices that must agree with what the trainer really builds (state bytes per device from the live
arrays' shards, and the same lowered train step). TPU topologies run where libtpu is importable
(e.g. PYTHONPATH=/work/tpu_site) and are skipped with the reason otherwise."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.sharding_worker import worker_env
from vit_jax.plan import hlo
from vit_jax.plan import topologies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny ViT (2 layers, width 32, 2 heads) on 8x8 grey digits: every mesh axis has something to split
# (fsdp_min_size 64 lets FSDP shard the small kernels; 2 heads split over tensor=2).
TINY = ['--config.model.name=ViT-testing', '--config.model.patch_size=2', '--config.dataset=digits',
        '--config.image_size=8', '--config.channels=1', '--config.batch_size=32',
        '--config.eval_batch_size=32', '--config.fsdp_min_size=64', '--config.progress=False',
        '--config.augment=none', "--config.mesh=(('data',2),('fsdp',2),('tensor',2))"]
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


def run_plan(*args, timeout=600, env=None):
  cmd = [sys.executable, '-m', 'vit_jax.plan', '--config=configs/quickstart.py', *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=env or worker_env())


# ---------- topology names (no JAX) ----------

@pytest.mark.parametrize('name,libtpu_name,chips,gen', [
    ('v5e-16', 'v5e:4x4', 16, 'v5e'), ('v5litepod-16', 'v5e:4x4', 16, 'v5e'),
    ('v5e-256', 'v5e:16x16', 256, 'v5e'), ('v4-32', 'v4:2x2x4', 16, 'v4'),
    ('v5p-64', 'v5p:2x4x4', 32, 'v5p'), ('v5p-256', 'v5p:4x4x8', 128, 'v5p'),
    ('v6e-64', 'v6e:8x8', 64, 'v6e'), ('v5p:4x4x8', 'v5p:4x4x8', 128, 'v5p'),
])
def test_cloud_tpu_names_map_to_libtpu_topologies(name, libtpu_name, chips, gen):
  t = topologies.parse(name)
  assert (t.platform, t.libtpu_name, t.chips, t.chip.name) == ('tpu', libtpu_name, chips, gen)
  kwargs = dict(t.libtpu_kwargs)
  # v4 and v5p names count TensorCores; two per chip, one JAX device ("megacore").
  assert kwargs['chip_config_name'] == ('megacore' if gen in ('v4', 'v5p') else 'default')


def test_chip_table_and_overrides():
  v5e = topologies.parse('v5e-16').chip
  assert v5e.hbm_bytes == 15.75 * 2 ** 30 and v5e.peak_flops == 197e12 and v5e.ici_bw == 400e9
  assert topologies.parse('v5p-8').chip.hbm_bytes == 95.73 * 2 ** 30
  small = topologies.parse('cpu:8').with_overrides(hbm_gib=0.5)
  assert small.chips == 8 and small.platform == 'cpu' and small.chip.hbm_bytes == 2 ** 29


@pytest.mark.parametrize('name,message', [
    ('v9-8', 'unknown TPU generation'), ('v4-7', 'multiple'), ('v5e-12', 'no default v5e slice'),
    ('cpu:0', 'N >= 1'), ('tpu', 'use cpu:N'), ('v5e:4x4x4', '2 dimensions')])
def test_bad_topology_names(name, message):
  with pytest.raises(ValueError, match=message):
    topologies.parse(name)


# ---------- the HLO collective reader (synthetic modules, no compile) ----------

HLO = """HloModule jit_train_step

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %x, f32[] %y)
}

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %x = f32[8,32]{1,0} parameter(0)
  %w = bf16[32,4]{1,0} parameter(1)
  %d = f32[8,4]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag = f32[256]{0} all-gather(f32[64]{0} %a), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ar = f32[256]{0} all-reduce(f32[256]{0} %ag), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  ROOT %t = (s32[], f32[256]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[256])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body2 (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %cp2 = f32[10]{0} collective-permute(f32[10] %z), channel_id=6, source_target_pairs={{0,1}}
}

%cond2 (p: (s32[], f32[256])) -> pred[] {
  %c5 = s32[]{:T(128)} constant(5)
  ROOT %lt2 = pred[] compare(%i2, %c5), direction=LT
}

ENTRY %main (x: f32[256]) -> f32[256] {
  %loop = (s32[], f32[256]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %loop2 = (s32[], f32[256]) while(%init), condition=%cond2, body=%body2
  %img = f32[2,8,8,3]{3,2,1,0} parameter(0)
  %k = f32[4,4,3,16]{3,2,1,0} parameter(1)
  %conv = f32[2,2,2,16]{3,2,1,0} convolution(%img, %k), window={size=4x4 stride=4x4}, dim_labels=b01f_01io->b01f
  %tconv = f32[2,8,8,3]{3,2,1,0} convolution(%conv, %k), window={size=4x4 pad=3_3x3_3 lhs_dilate=4x4}, dim_labels=b01f_01oi->b01f
  %rs = bf16[32]{0} reduce-scatter(bf16[256]{0} %y), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([8]) {'axis_1'}, dimensions={0}, to_apply=%add
  %cps = (f32[100], f32[100], u32[], u32[]) collective-permute-start(f32[100] %z), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[100]{0} collective-permute-done(%cps)
  %self = f32[100]{0} collective-permute(f32[100] %z), channel_id=5, source_target_pairs={{0,0},{1,1}}
  ROOT %r = f32[256] get-tuple-element(%loop), index=1
}
"""


def test_collectives_counts_sizes_groups_and_loops():
  a = hlo.analyze(HLO, num_devices=8)
  out, flops, once = a.collectives, a.flops, a.flops_once
  ag, ar, rs, cp = (out[k] for k in ('all-gather', 'all-reduce', 'reduce-scatter',
                                     'collective-permute'))
  # Inside the while body: 12 executions each.
  assert (ag.count, ag.buffer_bytes) == (12, 12 * 1024)
  assert ag.sent_bytes == pytest.approx(12 * 1024 * 3 / 4)  # group of 4 ([2,4]<=[8])
  assert ar.sent_bytes == pytest.approx(12 * 2 * 1024 * 1 / 2)  # groups of 2
  assert (rs.count, rs.buffer_bytes, rs.sent_bytes) == (1, 64, 3 * 64)  # axis_1: 4 devices
  # The async pair counts once (at -done); the self-to-self permute moves nothing; the second loop
  # has no known_trip_count: its condition `i < 5` gives 5 iterations.
  assert (cp.count, cp.buffer_bytes, cp.sent_bytes) == (2 + 5, 800 + 5 * 40, 400 + 5 * 40)
  assert out['all-to-all'].count == 0
  # 12 x the body's [8,32]x[32,4] dot; the patch conv: 2*2*2*16 outputs x 4*4 taps x 3 channels;
  # the transposed conv (input dilated 4x): each output meets 1 real value per dimension, 16 ch.
  convs = 2 * (2 * 2 * 2 * 16) * 16 * 3 + 2 * (2 * 8 * 8 * 3) * 16
  assert (flops, once) == (12 * 2 * 8 * 32 * 4 + convs, 2 * 8 * 32 * 4 + convs)
  # Per-instruction traffic: the loop's dot reads x (1 KiB) and w (256 B), writes 128 B, 12 times.
  dot = [row for row in a.ops if row[1] == 2 * 8 * 32 * 4]
  assert len(dot) == 1 and tuple(dot[0]) == (12, 2 * 8 * 32 * 4, 1024 + 256 + 128)
  assert a.op_seconds(peak_flops=1e6, hbm_bw=1e12) == pytest.approx(flops / 1e6)  # compute-bound


SCAN_HLO = """HloModule jit_train_step

%inner (q0: f32[24,64,64], q1: s32[]) -> f32[64,64] {
  %q0 = f32[24,64,64]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,64,64]{2,1,0} dynamic-slice(%q0, %q1, %z, %z), dynamic_slice_sizes={1,64,64}
  ROOT %b = f32[64,64]{1,0} bitcast(%ds)
}

%save (p0: f32[24,64,64], p1: f32[64,64], p2: s32[]) -> f32[24,64,64] {
  %p0 = f32[24,64,64]{2,1,0} parameter(0)
  %p1 = f32[64,64]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %e = f32[64,64]{1,0} exponential(%p1)
  %b = f32[1,64,64]{2,1,0} bitcast(%e)
  %z = s32[] constant(0)
  ROOT %u = f32[24,64,64]{2,1,0} dynamic-update-slice(%p0, %b, %p2, %z, %z)
}

%load (r0: f32[24,64,64], r1: s32[], r2: f32[64,64]) -> f32[64,64] {
  %r0 = f32[24,64,64]{2,1,0} parameter(0)
  %r1 = s32[] parameter(1)
  %r2 = f32[64,64]{1,0} parameter(2)
  %n = f32[64,64]{1,0} fusion(%r0, %r1), kind=kLoop, calls=%inner
  ROOT %m = f32[64,64]{1,0} multiply(%n, %r2)
}

%whole (w0: f32[24,64,64]) -> f32[64,64] {
  %w0 = f32[24,64,64]{2,1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %red = f32[64,64]{1,0} reduce(%w0, %c), dimensions={0}, to_apply=%add
}

%view (v0: f32[24,64,64]) -> f32[24,64,64] {
  %v0 = f32[24,64,64]{2,1,0} parameter(0)
  ROOT %vb = f32[24,64,64]{2,1,0} bitcast(%v0)
}

%viewsum (s0: f32[24,64,64]) -> f32[64,64] {
  %s0 = f32[24,64,64]{2,1,0} parameter(0)
  %vv = f32[24,64,64]{2,1,0} fusion(%s0), kind=kLoop, calls=%view
  %c2 = f32[] constant(0)
  ROOT %red2 = f32[64,64]{1,0} reduce(%vv, %c2), dimensions={0}, to_apply=%add
}

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %x, f32[] %y)
}

%body (p: (s32[], f32[24,64,64], f32[64,64])) -> (s32[], f32[24,64,64], f32[64,64]) {
  %i = s32[] parameter(0)
  %stack = f32[24,64,64]{2,1,0} parameter(1)
  %x = f32[64,64]{1,0} parameter(2)
  %saved = f32[24,64,64]{2,1,0} fusion(%stack, %x, %i), kind=kLoop, calls=%save
  %read = f32[64,64]{1,0} fusion(%stack, %i, %x), kind=kLoop, calls=%load
  %slice = f32[1,64,64]{2,1,0} dynamic-slice(%stack, %i, %i, %i), dynamic_slice_sizes={1,64,64}
  %put = f32[24,64,64]{2,1,0} dynamic-update-slice(%stack, %slice, %i, %i, %i)
  %sum = f32[64,64]{1,0} fusion(%stack), kind=kLoop, calls=%whole
  %sum2 = f32[64,64]{1,0} fusion(%stack), kind=kLoop, calls=%viewsum
  ROOT %t = (s32[], f32[24,64,64], f32[64,64]) tuple(%i, %saved, %read)
}

%cond (p: (s32[], f32[24,64,64], f32[64,64])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[24,64,64]) -> f32[64,64] {
  %loop = (s32[], f32[24,64,64], f32[64,64]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"24"}}
  ROOT %r = f32[64,64] get-tuple-element(%loop), index=2
}
"""


def test_scanned_loop_traffic_counts_the_slices_that_move():
  """A scanned layer stack saves and reads one layer's slice of [L, ...] buffers per iteration:
  the roofline counts the slice, not the stack (counted whole, ViT-L/16's plan on a v5p-64 was
  13x slower than unrolled); a fusion that reads the whole stack still pays for all of it."""
  a = hlo.analyze(SCAN_HLO, num_devices=1)
  layer, stack, index = 64 * 64 * 4, 24 * 64 * 64 * 4, 4
  per_iteration = sorted(row[2] for row in a.ops)
  assert all(row[0] == 24 for row in a.ops)
  assert per_iteration == sorted([
      layer + layer + index,  # %saved: reads x, writes its slice of the stack in place
      3 * layer + index,      # %read: a slice of the stack (through a nested fusion), x, result
      2 * layer,              # %slice: one layer out
      2 * layer,              # %put: one layer in, in place
      stack + layer,          # %sum: reads every layer
      stack + layer,          # %sum2: the same through a nested fusion that only views the stack
  ])
  assert a.hbm_bytes == pytest.approx(24 * sum(per_iteration))


def test_shape_bytes_and_group_formats():
  assert hlo.shape_bytes('(f32[8,16]{1,0}, bf16[4], /*index=2*/s32[])') == 512 + 8 + 4
  assert hlo.group_size('replica_groups={}', 16) == 16
  assert hlo.group_size('replica_groups=[4,32]<=[32,4]T(1,0)', 128) == 32


# ---------- plans on 8 fake CPU devices ----------

def test_cpu8_plan_matches_the_trainers_live_state_and_step(tmp_path):
  """The plan's bytes per device equal the live sharded state the trainer creates (params, Adam
  moments, EMA: summed over each device's addressable shards), and the step the plan compiles is
  the one the trainer runs (same lowered-HLO fingerprint, taken from inside the trainer)."""
  out = tmp_path / 'w.json'
  proc = subprocess.run([sys.executable, 'tests/plan_worker.py', str(out), *TINY,
                         '--config.ema_decay=0.99'], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=worker_env())
  assert proc.returncode == 0, proc.stderr[-4000:]
  rec = json.loads(out.read_text())
  plan, trainer = rec['plan'], rec['trainer']
  assert trainer['devices'] == 8
  for key in ('parameters', 'optimizer', 'ema'):
    assert len(trainer[key]) == 8
    assert set(trainer[key].values()) == {plan[key]}, (key, plan[key], trainer[key])
  # Adam's two moments (plus its step counts); sharding really split the state over the devices.
  assert 2 * plan['parameters'] <= plan['optimizer'] <= 2 * plan['parameters'] + 64
  assert plan['parameters'] < 0.5 * trainer['global_parameters']
  assert trainer['fingerprint'] == plan['fingerprint']


def _field(text, pattern):
  m = re.search(pattern, text)
  assert m, (pattern, text)
  return m.group(1)


def test_cpu8_plan_cli_fits_and_does_not_fit():
  out = run_plan('--topology=cpu:8', *TINY)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert text.rstrip().endswith('fits: yes')
  assert 'mesh data2xfsdp2xtensor2' in text and '(8 x cpu)' in text
  for kind in ('all-reduce', 'all-gather'):  # data/fsdp gradients, fsdp parameters
    assert int(_field(text, rf'{kind}\s+(\d+) ops')) > 0
  # The compiled matmuls are the family's analytic count: forward + backward = 3 x forward.
  assert abs(float(_field(text, r'ratio ([\d.]+)\)')) - 1) < 0.02

  tight = run_plan('--topology=cpu:8', '--hbm_gib=0.0001', *TINY)  # 105 KB per device
  assert tight.returncode == 1, tight.stderr[-3000:]
  assert tight.stdout.rstrip().endswith('fits: no')
  assert float(_field(tight.stdout, r'HBM \(([\d.]+)%\)')) > 100


def test_bad_input_exits_2():
  out = run_plan('--topology=v9-8', *TINY, timeout=120)
  assert out.returncode == 2 and 'unknown TPU generation' in out.stderr
  out = run_plan('--topology=cpu:8', '--config.bach_size=3', timeout=120)
  assert out.returncode == 2 and "unknown config key 'bach_size'" in out.stderr


@pytest.mark.skipif(HAS_LIBTPU, reason='libtpu is importable here: the missing-libtpu message '
                                       'cannot be shown')
def test_tpu_topology_without_libtpu_says_how_to_install():
  out = run_plan('--topology=v5e-16', *TINY, timeout=120)
  assert out.returncode == 2
  assert 'pip install -r requirements-tpu.txt' in out.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not importable (pip install -r '
                                           'requirements-tpu.txt, or PYTHONPATH=/work/tpu_site)')
def test_tpu_v5e16_plan_compiles_through_libtpu():
  tiny = [a for a in TINY if not a.startswith('--config.mesh')]
  out = run_plan('--topology=v5e-16', *tiny, "--config.mesh=(('data',4),('fsdp',4))",
                 env=worker_env(JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
                     [ROOT, *os.environ.get('PYTHONPATH', '').split(os.pathsep)])))
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert '(16 x v5e)' in text and 'bfloat16' in text and 'mesh data4xfsdp4' in text
  assert 'ICI 400 GB/s' in text and text.rstrip().endswith('fits: yes')


@pytest.mark.slow
def test_cpu8_suggest_ranks_fitting_meshes():
  tiny = [a for a in TINY if not a.startswith('--config.mesh')]
  out = run_plan('--topology=cpu:8', '--suggest', '--max_compiles=3', *tiny)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [l for l in out.stdout.splitlines() if re.match(r'^(data|fsdp|tensor)\d', l)]
  assert len(rows) == 3, out.stdout
  steps = [float(r.split()[-3]) for r in rows if ' yes ' in r]
  assert steps == sorted(steps) and steps
  assert 'pick: --config.mesh=' in out.stdout


def test_a_plan_the_compiler_refused_has_no_rate_instead_of_dividing_by_zero():
  """An out-of-memory compile leaves no step time (suggest then lists it as not fitting)."""
  import types  # pylint: disable=import-outside-toplevel
  from vit_jax.plan import core  # pylint: disable=import-outside-toplevel
  refused = types.SimpleNamespace(batch_size=4096, times={'step': 0.0}, chips=16,
                                  analytic_flops_per_step=1e15,
                                  topology=types.SimpleNamespace(chip=types.SimpleNamespace(
                                      peak_flops=197e12)))
  assert core.Plan.images_per_second.fget(refused) == 0.0
  assert core.Plan.mfu.fget(refused) == 0.0
  refused.times['step'] = 2.0
  assert core.Plan.images_per_second.fget(refused) == 2048.0
  assert core.Plan.mfu.fget(refused) == pytest.approx(1e15 / (2.0 * 16 * 197e12))


# The ViT's later variants (LayerScale, registers without position rows, fc_norm after the mean):
# their step plans like the plain ViT's, and the compiled matmuls are the family's analytic count.
VARIANT = ['--config.model.layer_scale=0.1', '--config.model.num_registers=2',
           '--config.model.no_embed_class=True', '--config.model.fc_norm=True',
           '--config.model.classifier=gap', '--config.model.posemb=learned']


@pytest.mark.parametrize('topology', ['cpu:8', 'v5e-16'])
def test_vit_variant_plans(topology):
  if topology != 'cpu:8' and not HAS_LIBTPU:
    pytest.skip('libtpu is not importable (pip install -r requirements-tpu.txt, or '
                'PYTHONPATH=/work/tpu_site)')
  tiny = TINY if topology == 'cpu:8' else [a for a in TINY if not a.startswith('--config.mesh')] + [
      "--config.mesh=(('data',4),('fsdp',4))"]
  env = worker_env(JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      [ROOT, *os.environ.get('PYTHONPATH', '').split(os.pathsep)]))
  out = run_plan(f'--topology={topology}', *tiny, *VARIANT, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.rstrip().endswith('fits: yes')
  if topology == 'cpu:8':
    assert abs(float(_field(out.stdout, r'ratio ([\d.]+)\)')) - 1) < 0.02
