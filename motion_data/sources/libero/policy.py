"""A scripted reach / grasp / lift / place controller with randomised motion.

Pure numpy; no simulator needed. It emits actions for robosuite's OSC_POSE controller in
delta mode (``[dx, dy, dz, droll, dpitch, dyaw, gripper]`` in [-1, 1]; 1 = the
controller's largest step, 5 cm of end-effector travel per control step; gripper -1 open,
+1 closed). Every rollout draws its own ``Motion``: speed, gain, heights, a grasp offset
that sometimes misses the object (a failed grasp), a place offset, pauses before phases,
action noise and a wrist turn, so that the motion varies the way a policy's does rather
than repeating one trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_STEP_M = 0.05  # metres of travel per control step at action 1 (robosuite OSC_POSE default output_max)
OPEN, CLOSED = -1.0, 1.0
PHASES = ("reach", "descend", "grasp", "lift", "carry", "lower", "release", "retreat", "wander")


@dataclass(frozen=True)
class Motion:
    """The randomised parameters of one rollout."""
    speed: float          # largest translation action (share of MAX_STEP_M per step)
    gain: float           # proportional gain: action = gain * error / MAX_STEP_M
    hover: float          # m above the object when reaching and carrying
    grasp_height: float   # m above the object's origin where the gripper closes
    lift: float           # m lifted after the grasp
    grasp_offset: np.ndarray  # (3,) m added to the grasp point; large = a missed grasp
    place_offset: np.ndarray  # (3,) m added to the place point
    pauses: dict          # phase -> steps of standing still before it
    hold_steps: int       # steps the gripper takes to close / open
    noise: float          # std of the action noise
    yaw_rate: float       # wrist turn per step while reaching (action units)
    tol: float = 0.015    # m: a waypoint counts as reached
    timeout: int = 45     # steps before a phase gives up and moves on
    grasp_fails: bool = False
    wander: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # offsets visited after the place


def draw_motion(rng: np.random.Generator) -> Motion:
    """Random motion parameters: each rollout moves at its own pace and makes its own mistakes."""
    fails = bool(rng.random() < 0.25)
    off = rng.normal(0.0, 0.008, 3) * np.array([1, 1, 0])
    if fails:  # miss by 3-6 cm in a random direction
        a = rng.uniform(0, 2 * np.pi)
        off = off + rng.uniform(0.03, 0.06) * np.array([np.cos(a), np.sin(a), 0.0])
    pauses = {p: int(rng.integers(3, 16)) for p in PHASES if rng.random() < 0.3}
    return Motion(
        speed=float(rng.uniform(0.3, 1.0)),
        gain=float(rng.uniform(2.0, 6.0)),
        hover=float(rng.uniform(0.08, 0.16)),
        grasp_height=float(rng.uniform(0.0, 0.03)),
        lift=float(rng.uniform(0.08, 0.2)),
        grasp_offset=off,
        place_offset=np.array([*rng.normal(0.0, 0.03, 2), 0.0]),
        pauses=pauses,
        hold_steps=int(rng.integers(5, 12)),
        noise=float(rng.uniform(0.0, 0.1)),
        yaw_rate=float(rng.uniform(-0.15, 0.15)) if rng.random() < 0.5 else 0.0,
        grasp_fails=fails,
        wander=np.column_stack([rng.uniform(-0.15, 0.15, 4), rng.uniform(-0.15, 0.15, 4), rng.uniform(0.05, 0.25, 4)]),
    )


class PickPlace:
    """Phase machine: ``act(ee, pick, place, rng)`` -> action (7,). Targets follow the objects.

    ``pick`` and ``place`` are the current world positions (3,) of the object to grasp and of
    the place to put it; ``ee`` is the gripper's position. After the place it wanders between
    random points above the place (so a rollout can be as long as asked).
    """

    def __init__(self, motion: Motion):
        self.m = motion
        self.phase = 0
        self.steps_in_phase = 0
        self.paused = 0
        self.hold = 0
        self.wander_i = 0
        self.gripper = OPEN
        self.anchor = None  # the pick position when the gripper closed: lift from there, not with the object

    @property
    def phase_name(self) -> str:
        return PHASES[min(self.phase, len(PHASES) - 1)]

    def _target(self, pick, place):
        m = self.m
        up = np.array([0.0, 0.0, 1.0])
        name = self.phase_name
        if name == "grasp" and self.anchor is None:
            self.anchor = pick.copy()
        grasp = (pick if self.anchor is None else self.anchor) + m.grasp_offset + up * m.grasp_height
        drop = place + m.place_offset
        if name == "reach":
            return grasp + up * m.hover
        if name in ("descend", "grasp"):
            return grasp
        if name == "lift":
            return grasp + up * m.lift
        if name == "carry":
            return drop + up * (m.hover + m.lift / 2)
        if name in ("lower", "release"):
            return drop + up * m.hover / 2
        if name == "retreat":
            return drop + up * (m.hover + m.lift)
        return place + m.wander[self.wander_i % max(len(m.wander), 1)] if len(m.wander) else drop + up * m.hover

    def _advance(self):
        self.phase = min(self.phase + 1, len(PHASES) - 1)
        self.steps_in_phase = 0
        self.paused = self.m.pauses.get(self.phase_name, 0)
        self.hold = 0

    def act(self, ee, pick, place, rng: np.random.Generator) -> np.ndarray:
        m = self.m
        a = np.zeros(7)
        if self.paused > 0:  # standing still, as a hesitating policy does
            self.paused -= 1
            a[6] = self.gripper
            return a
        name = self.phase_name
        target = self._target(np.asarray(pick, float), np.asarray(place, float))
        err = target - np.asarray(ee, float)
        a[:3] = np.clip(m.gain * err / MAX_STEP_M, -m.speed, m.speed)
        a[:3] += rng.normal(0.0, m.noise, 3)
        if name == "reach":
            a[5] = m.yaw_rate
        if name in ("grasp", "release"):
            self.gripper = CLOSED if name == "grasp" else OPEN
            self.hold += 1
            done = self.hold >= m.hold_steps
        else:
            done = np.linalg.norm(err) < m.tol
        self.steps_in_phase += 1
        if name == "wander" and (done or self.steps_in_phase >= m.timeout):
            self.wander_i += 1
            self.steps_in_phase = 0
        elif done or self.steps_in_phase >= m.timeout:
            self._advance()
        a[6] = self.gripper
        return np.clip(a, -1.0, 1.0)
