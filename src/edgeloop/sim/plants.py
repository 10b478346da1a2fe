"""The physics behind each appliance kind: small state machines stepped once per sample.

A plant holds an appliance's physical state (temperatures, water in a tank, drum speed,
relay positions) and advances it by one sampling interval given the time of day, the
fault knobs (``Knobs``) and this sample's random draws. It returns the true value of each
sensor, in the order of the appliance model's ``sensors``; the generator adds sensor noise,
quantisation and sensor faults on top.

Plants draw no random numbers themselves: each declares how many uniforms and normals it
takes per sample (``UNIFORMS``, ``NORMALS``) and gets exactly that many every step, from
its own stream, whatever happens. So a fault that changes the plant's path (a stuck relay)
never shifts the noise of later samples, and a run with a fault can be compared sample by
sample with the same seed's run without it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from edgeloop.sim.models import (
    ApplianceModel,
    FridgeParams,
    FurnaceParams,
    PumpParams,
    WasherParams,
)

DAY_S = 86400.0
ATM_BAR = 1.013
# Household activity by local hour (relative weights): fridge doors and water draws follow it.
HOUSEHOLD_ACTIVITY = (
    0.1, 0.05, 0.05, 0.05, 0.05, 0.2, 0.8, 1.8, 1.8, 1.0, 0.7, 0.8,
    1.4, 1.2, 0.7, 0.6, 0.8, 1.2, 1.9, 2.0, 1.4, 1.0, 0.6, 0.3,
)  # fmt: skip
_ACTIVITY_MEAN = sum(HOUSEHOLD_ACTIVITY) / 24


def activity(local_h: float) -> float:
    """Household activity at ``local_h`` relative to the day's mean (averages 1 over a day)."""
    return HOUSEHOLD_ACTIVITY[int(local_h) % 24] / _ACTIVITY_MEAN


@dataclass(frozen=True, kw_only=True, slots=True)
class Knobs:
    """The fault knobs at one sample, each 0 (healthy) to 1, and the relay fault's draw."""

    wear: float = 0.0
    capacity_loss: float = 0.0
    restriction: float = 0.0
    stick_on: float = 0.0
    stick_off: float = 0.0
    relay_roll: float = 1.0  # uniform in [0, 1): the relay sticks when below its knob


HEALTHY = Knobs()


class Plant(Protocol):
    """An appliance's physical state, advanced one sample at a time."""

    UNIFORMS: int
    NORMALS: int

    def step(
        self, t: float, local_h: float, knobs: Knobs, u: Sequence[float], n: Sequence[float]
    ) -> tuple[float, ...]:
        """Advance to time ``t`` (s since the epoch); the true value of each sensor."""
        ...


def relay(closed: bool, command: bool, knobs: Knobs) -> bool:
    """The relay's position after it is told ``command``: a sticky contact may not move."""
    if command == closed:
        return closed
    if closed and knobs.relay_roll < knobs.stick_on:
        return True
    if not closed and knobs.relay_roll < knobs.stick_off:
        return False
    return command


def wear_factor(wear: float, burst: float) -> float:
    """How much worn bearings multiply a running machine's vibration (with bursts)."""
    return (1.0 + 6.0 * wear * wear) * (1.0 + 0.5 * wear * abs(burst))


class DutyWindow:
    """Share of the last ``seconds`` a relay was closed, over whole samples."""

    def __init__(self, seconds: float, interval_s: float) -> None:
        self._size = max(1, round(seconds / interval_s))
        self._samples: deque[bool] = deque()
        self._on = 0

    def push(self, on: bool) -> float:
        """Record this sample; the duty cycle in percent."""
        self._samples.append(on)
        self._on += on
        if len(self._samples) > self._size:
            self._on -= self._samples.popleft()
        return 100.0 * self._on / len(self._samples)


def _ar1(value: float, dt: float, tau: float, sd: float, n: float) -> float:
    """One step of a mean-zero AR(1) wander with time constant ``tau`` and spread ``sd``."""
    a = math.exp(-dt / tau)
    return a * value + math.sqrt(1.0 - a * a) * sd * n


def _saturation_hpa(t_c: float) -> float:
    """Water's saturation vapour pressure (Magnus formula)."""
    return 6.112 * math.exp(17.62 * t_c / (243.12 + t_c))


def _approach(value: float, target: float, dt: float, tau: float) -> float:
    return target + (value - target) * math.exp(-dt / tau)


class FurnacePlant:
    """A house heated by a furnace; the kit sits on the furnace's plenum and blower."""

    UNIFORMS = 0
    NORMALS = 3  # weather wander, indoor humidity wander, bearing-wear burst

    def __init__(self, p: FurnaceParams, interval_s: float, start_h: float) -> None:
        self.p = p
        self.dt = interval_s
        self.indoor_c = self._setpoint(start_h)
        self.supply_c = self.indoor_c
        self.weather_c = 0.0
        self.rh_wander = 0.0
        self.calling = False
        self.relay_closed = False
        self.limit_tripped = False
        self.blower_until = -math.inf
        self.duty = DutyWindow(3600.0, interval_s)

    def _setpoint(self, local_h: float) -> float:
        p = self.p
        night = (
            p.night_from_h <= local_h or local_h < p.night_to_h
            if p.night_from_h > p.night_to_h
            else p.night_from_h <= local_h < p.night_to_h
        )
        return p.night_setpoint_c if night else p.day_setpoint_c

    def step(
        self, t: float, local_h: float, knobs: Knobs, u: Sequence[float], n: Sequence[float]
    ) -> tuple[float, ...]:
        p, dt = self.p, self.dt
        self.weather_c = _ar1(self.weather_c, dt, 6 * 3600.0, p.weather_sd_c, n[0])
        self.rh_wander = _ar1(self.rh_wander, dt, 3 * 3600.0, 3.0, n[1])
        outdoor = (
            p.outdoor_mean_c
            + p.outdoor_swing_c * math.cos(2 * math.pi * (local_h - 15.0) / 24.0)
            + self.weather_c
        )
        setpoint = self._setpoint(local_h)
        if self.indoor_c < setpoint - p.hysteresis_c / 2:
            self.calling = True
        elif self.indoor_c > setpoint + p.hysteresis_c / 2:
            self.calling = False
        self.relay_closed = relay(self.relay_closed, self.calling, knobs)
        # The high-limit switch is in series with the gas valve: a stuck relay does not
        # bypass it, so a choked furnace short-cycles on the limit.
        if self.supply_c > p.high_limit_c:
            self.limit_tripped = True
        elif self.supply_c < p.limit_reset_c:
            self.limit_tripped = False
        burner = self.relay_closed and not self.limit_tripped
        if burner:
            self.blower_until = t + p.fan_off_delay_s
        blower = burner or t < self.blower_until

        capacity = 1.0 - knobs.capacity_loss
        airflow = 1.0 - 0.6 * knobs.restriction
        heat = p.heat_rate_c_s * capacity * (0.75 + 0.25 * airflow) if burner else 0.0
        self.indoor_c += dt * ((outdoor - self.indoor_c) / p.house_tau_s + heat)
        if burner:
            target = self.indoor_c + p.temperature_rise_c * capacity / airflow
            self.supply_c = _approach(self.supply_c, target, dt, p.exchanger_tau_s)
        else:
            # With the blower off the plenum cools slowly, by convection only.
            tau = p.exchanger_tau_s if blower else 10 * p.exchanger_tau_s
            self.supply_c = _approach(self.supply_c, self.indoor_c, dt, tau)

        indoor_rh = min(95.0, max(10.0, p.indoor_rh_pct + self.rh_wander))
        supply_rh = indoor_rh * _saturation_hpa(self.indoor_c) / _saturation_hpa(self.supply_c)

        friction = 1.0 + 0.12 * knobs.wear
        current = p.standby_current_a
        if blower:
            current += p.blower_current_a * (0.55 + 0.45 * airflow) * friction
        if burner:
            current += p.inducer_current_a * friction
        running = 0.06 * blower + 0.02 * burner
        vibration = 0.004 + running * wear_factor(knobs.wear, n[2])
        duty = self.duty.push(burner)
        return (self.supply_c, supply_rh, current, vibration, duty)


class FridgePlant:
    """A refrigerator's cabinet and compressor."""

    UNIFORMS = 2  # door opening arrival, its length
    NORMALS = 1  # bearing-wear burst

    def __init__(self, p: FridgeParams, interval_s: float) -> None:
        self.p = p
        self.dt = interval_s
        self.cabinet_c = p.setpoint_c
        self.calling = False
        self.compressor = False
        self.off_since = -math.inf
        self.door_until = -math.inf
        self.duty = DutyWindow(3600.0, interval_s)

    def step(
        self, t: float, local_h: float, knobs: Knobs, u: Sequence[float], n: Sequence[float]
    ) -> tuple[float, ...]:
        p, dt = self.p, self.dt
        room = p.room_mean_c + p.room_swing_c * math.cos(2 * math.pi * (local_h - 16.0) / 24.0)
        rate = p.door_openings_per_day * activity(local_h) / DAY_S
        if t >= self.door_until and u[0] < rate * dt:
            low, high = p.door_open_s
            self.door_until = t + low + (high - low) * u[1]
        door_open = t < self.door_until

        if self.cabinet_c > p.setpoint_c + p.hysteresis_c / 2:
            self.calling = True
        elif self.cabinet_c < p.setpoint_c - p.hysteresis_c / 2:
            self.calling = False
        command = self.calling and (self.compressor or t - self.off_since >= p.min_off_s)
        was_on = self.compressor
        self.compressor = relay(self.compressor, command, knobs)
        if was_on and not self.compressor:
            self.off_since = t

        exchange = 1.0 / p.leak_tau_s + (1.0 / p.door_tau_s if door_open else 0.0)
        capacity = 1.0 - 0.8 * knobs.capacity_loss
        cooling = p.cooling_rate_c_s * capacity if self.compressor else 0.0
        self.cabinet_c += dt * ((room - self.cabinet_c) * exchange - cooling)
        self.cabinet_c = max(self.cabinet_c, -25.0)  # the evaporator's own temperature

        current = p.standby_current_a
        if self.compressor:
            # A warmer cabinet means a higher suction pressure and more work per stroke;
            # with refrigerant lost the compressor moves less mass and draws less.
            load = 1.0 + 0.015 * (self.cabinet_c - p.setpoint_c)
            current += (
                p.compressor_current_a
                * load
                * (1.0 - 0.2 * knobs.capacity_loss)
                * (1.0 + 0.12 * knobs.wear)
            )
        vibration = 0.002 + (0.025 * wear_factor(knobs.wear, n[0]) if self.compressor else 0.0)
        duty = self.duty.push(self.compressor)
        return (self.cabinet_c, current, vibration, duty)


class WasherPlant:
    """A washing machine's drum, water and programme."""

    NORMALS = 1  # bearing-wear burst

    def __init__(self, p: WasherParams, interval_s: float, utc_offset_s: float) -> None:
        self.p = p
        self.dt = interval_s
        self.offset = utc_offset_s
        self.UNIFORMS = 2 * len(p.slots) + 1  # per slot: whether, when; per load: imbalance
        self.day = -1
        self.starts: list[float] = []
        self.phase = -1  # index into the programme; -1 while idle
        self.elapsed = 0.0
        self.volume = 0.0
        self.rpm = 0.0
        self.water_c = p.room_c
        self.imbalance = 0.0

    def _plan_day(self, t: float, u: Sequence[float]) -> None:
        local = t + self.offset
        self.day = int(local // DAY_S)
        midnight = self.day * DAY_S - self.offset
        self.starts = sorted(
            midnight + 3600.0 * (slot.hour + slot.jitter_h * (2.0 * u[2 * i + 1] - 1.0))
            for i, slot in enumerate(self.p.slots)
            if u[2 * i] < slot.probability
        )
        self.starts = [s for s in self.starts if s >= t]

    def step(
        self, t: float, local_h: float, knobs: Knobs, u: Sequence[float], n: Sequence[float]
    ) -> tuple[float, ...]:
        p, dt = self.p, self.dt
        if int((t + self.offset) // DAY_S) != self.day:
            self._plan_day(t, u)
        if self.phase < 0 and self.starts and t >= self.starts[0]:
            self.starts.pop(0)
            self.phase, self.elapsed, self.volume = 0, 0.0, 0.0
            low, high = p.imbalance_g
            self.imbalance = low + (high - low) * u[-1]

        flow = 0.0
        target_rpm = 0.0
        agitating = draining = False
        if self.phase >= 0:
            phase = p.programme[self.phase]
            self.elapsed += dt
            draining = phase.drain
            if phase.volume_l > 0:
                flow = p.fill_flow_lpm * (1.0 - 0.7 * knobs.restriction)
                self.volume += flow * dt / 60.0
                self.water_c = _approach(self.water_c, p.inlet_water_c, dt, 20.0)
                done = self.volume >= phase.volume_l
            else:
                done = self.elapsed >= phase.seconds
            if phase.agitate:
                # Tumble 12 s one way, rest 3 s, and again.
                agitating = self.elapsed % 15.0 < 12.0
                target_rpm = phase.drum_rpm if agitating else 0.0
            else:
                target_rpm = phase.drum_rpm
            if phase.heat_to_c is not None and self.water_c < phase.heat_to_c:
                self.water_c = min(phase.heat_to_c, self.water_c + p.heat_rate_c_s * dt)
            if done:
                self.phase, self.elapsed, self.volume = self.phase + 1, 0.0, 0.0
                if self.phase >= len(p.programme):
                    self.phase = -1
        if self.phase < 0 or draining:
            self.water_c = _approach(self.water_c, p.room_c, dt, 1800.0)
        accelerating = target_rpm > self.rpm + 20.0
        self.rpm = _approach(self.rpm, target_rpm, dt, p.spin_tau_s)

        friction = 1.0 + 0.12 * knobs.wear
        current = p.idle_current_a
        if self.rpm > 5.0:
            motor = p.spin_current_a * (self.rpm / 1400.0) ** 2 + (0.3 if accelerating else 0.0)
            if agitating:
                motor += p.agitate_current_a
            current += motor * friction
        if draining:
            current += p.drain_pump_current_a
        r = self.rpm / p.resonance_rpm
        response = r * r / math.sqrt((1.0 - r * r) ** 2 + (2.0 * p.damping * r) ** 2)
        running = self.imbalance * response + (p.agitate_vibration_g if agitating else 0.0)
        running += 0.01 * draining
        vibration = 0.003 + running * wear_factor(knobs.wear, n[0])
        return (current, vibration, flow, self.water_c)


class PumpPlant:
    """A well pump, its pressure tank and switch, and the household drawing water."""

    UNIFORMS = 3  # draw arrival, which kind, how long
    NORMALS = 2  # bearing-wear burst, cavitation

    def __init__(self, p: PumpParams, interval_s: float) -> None:
        self.p = p
        self.dt = interval_s
        self.water_l = self._water_at((p.cut_in_bar + p.cut_out_bar) / 2)
        self.pump = False
        self.calling = False
        self.draws: list[tuple[float, float]] = []  # (until, flow L/min)
        self.duty = DutyWindow(3600.0, interval_s)
        total = sum(d.share for d in p.draws)
        self.shares = [d.share / total for d in p.draws]

    def _water_at(self, bar: float) -> float:
        """Water in the tank at gauge pressure ``bar`` (Boyle's law on the air charge)."""
        p = self.p
        return max(0.0, p.tank_l * (1.0 - (p.precharge_bar + ATM_BAR) / (bar + ATM_BAR)))

    def _pressure(self) -> float:
        p = self.p
        return (p.precharge_bar + ATM_BAR) * p.tank_l / (p.tank_l - self.water_l) - ATM_BAR

    def step(
        self, t: float, local_h: float, knobs: Knobs, u: Sequence[float], n: Sequence[float]
    ) -> tuple[float, ...]:
        p, dt = self.p, self.dt
        rate = p.draws_per_day * activity(local_h) / DAY_S
        if u[0] < rate * dt:
            pick, acc = len(p.draws) - 1, 0.0
            for i, share in enumerate(self.shares):
                acc += share
                if u[1] < acc:
                    pick = i
                    break
            draw = p.draws[pick]
            low, high = draw.seconds
            self.draws.append((t + low + (high - low) * u[2], draw.flow_lpm))
        self.draws = [d for d in self.draws if d[0] > t]
        demand = sum(flow for _, flow in self.draws)

        pressure = self._pressure() if self.water_l > 0 else 0.0
        if pressure <= p.cut_in_bar:
            self.calling = True
        elif pressure >= p.cut_out_bar:
            self.calling = False
        self.pump = relay(self.pump, self.calling, knobs)

        max_flow = p.max_flow_lpm * (1.0 - 0.8 * knobs.restriction)
        head = max(pressure, 0.0)
        flow = max_flow * math.sqrt(max(0.0, 1.0 - head / p.shutoff_bar)) if self.pump else 0.0
        self.water_l += (flow - demand) * dt / 60.0
        relief_water = self._water_at(p.relief_bar)
        if self.water_l > relief_water:  # the relief valve dumps the excess
            self.water_l = relief_water
        if self.water_l > 0:
            pressure = self._pressure()
        else:
            # The tank is empty: the house gets what the pump gives, at the pump's head.
            self.water_l = 0.0
            share = min(1.0, flow / demand) if demand > 0 else 0.0
            pressure = p.precharge_bar * share if self.pump else 0.0

        current = p.idle_current_a
        vibration = 0.003
        if self.pump:
            fraction = flow / p.max_flow_lpm
            current += (
                p.shutoff_current_a + (p.motor_current_a - p.shutoff_current_a) * fraction
            ) * (1.0 + 0.12 * knobs.wear)
            running = p.running_vibration_g * wear_factor(knobs.wear, n[0])
            # A starved intake cavitates: broadband vibration once the screen is half shut.
            cavitation = 0.25 * max(0.0, knobs.restriction - 0.4) / 0.6 * (1.0 + abs(n[1]))
            vibration += running + cavitation
        duty = self.duty.push(self.pump)
        return (pressure, flow, current, vibration, duty)


def make_plant(
    model: ApplianceModel, interval_s: float, start_t: float, utc_offset_s: float
) -> Plant:
    """A fresh plant for ``model``, sampled every ``interval_s``, starting at ``start_t``."""
    params = model.params
    start_h = ((start_t + utc_offset_s) % DAY_S) / 3600.0
    if isinstance(params, FurnaceParams):
        return FurnacePlant(params, interval_s, start_h)
    if isinstance(params, FridgeParams):
        return FridgePlant(params, interval_s)
    if isinstance(params, WasherParams):
        return WasherPlant(params, interval_s, utc_offset_s)
    return PumpPlant(params, interval_s)
