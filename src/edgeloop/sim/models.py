"""Appliances, their sensors and their fault modes, described as data.

Four appliance kinds (``APPLIANCES``), each with the sensors its monitoring kit carries,
its sampling interval and the parameters of its physics (``edgeloop.sim.plants``):

- ``furnace``: a gas furnace with a blower, run by a room thermostat (night setback)
  against a daily outdoor temperature curve. Supply-air temperature and humidity, blower
  current, vibration RMS, burner duty cycle over the last hour.
- ``fridge``: a refrigerator's compressor cycling on the cabinet thermostat, with door
  openings clustered at meal times. Cabinet temperature, compressor current, vibration RMS,
  compressor duty cycle.
- ``washer``: a washing machine running programmes (fill, wash with heating, drain, spin,
  rinse, final spin) at a couple of times a day. Motor current, vibration RMS with a peak
  where the spinning drum passes its resonance, inlet water flow, water temperature.
- ``pump``: a well pump with a pressure tank and a pressure switch, driven by household
  water draws (taps, showers, toilets). Pressure, pump flow, motor current, vibration RMS,
  pump duty cycle.

Fault modes (``FAULTS``) act in one of two ways. *Physical* faults turn a knob of the
appliance's physics, so every sensor that depends on it changes the way the real machine's
would: bearing wear (``Knob.WEAR``), a refrigerant leak (``Knob.CAPACITY_LOSS``), a clogged
filter (``Knob.RESTRICTION``), a relay stuck closed or open (``Knob.STICK_ON`` /
``Knob.STICK_OFF``). *Sensor* faults change what a sensor reports: dropout, a stuck value,
isolated spikes. A fault's level at time t is ``severity * ramp(t)`` in [0, 1]
(``edgeloop.sim.scenario.FaultInjection.level``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from edgeloop.core.errors import ValidationError


class Quantity(StrEnum):
    """What a sensor measures."""

    TEMPERATURE = "temperature"
    HUMIDITY = "humidity"
    VIBRATION_RMS = "vibration_rms"
    MOTOR_CURRENT = "motor_current"
    PRESSURE = "pressure"
    FLOW = "flow"
    DUTY_CYCLE = "duty_cycle"


@dataclass(frozen=True, kw_only=True)
class SensorSpec:
    """One sensor of a kit: what it measures, and how its reading departs from the truth.

    A reading is ``truth * (1 + noise_rel·n₁) + noise_sd·n₂`` (n₁, n₂ standard normal),
    clamped to [low, high] (the sensor's range) and rounded to ``resolution``.
    """

    name: str
    quantity: Quantity
    unit: str
    resolution: float
    low: float
    high: float
    noise_sd: float = 0.0
    noise_rel: float = 0.0
    spike: float  # the typical size of an outlier, in the sensor's unit
    description: str


class Knob(StrEnum):
    """A physical quantity a fault turns, from 0 (healthy) to 1 (at its worst)."""

    WEAR = "wear"  # bearing wear: vibration grows ~ quadratically, friction draws current
    CAPACITY_LOSS = "capacity_loss"  # share of heating/cooling capacity lost
    RESTRICTION = "restriction"  # share of a filter's flow area blocked
    STICK_ON = "stick_on"  # chance, per sample, that the relay fails to open when told to
    STICK_OFF = "stick_off"  # chance, per sample, that the relay fails to close when told to


class SensorFault(StrEnum):
    """A fault in the sensor rather than in the appliance."""

    DROPOUT = "dropout"  # the reading is missing with probability = level
    STUCK = "stuck"  # the sensor repeats the value it had when the fault began
    SPIKES = "spikes"  # isolated outliers: rate = level * SPIKE_RATE per sensor per sample


SPIKE_RATE = 0.02  # outliers per sensor per sample at level 1


@dataclass(frozen=True, kw_only=True)
class FaultMode:
    """One way a kit's readings go wrong, and what it changes."""

    name: str
    title: str
    applies_to: frozenset[str]
    knob: Knob | None = None
    sensor_fault: SensorFault | None = None
    default_ramp_s: float = 0.0
    # Which sensors a sensor fault hits when the injection names none.
    default_sensors: Literal["all", "first"] = "all"
    signature: str  # what changes in the readings, in words (the catalog prints it)


# --- appliance parameters ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FurnaceParams:
    """A furnace heating a house: a one-node thermal model with a thermostat."""

    outdoor_mean_c: float = 0.0
    outdoor_swing_c: float = 5.0  # half the day's range; coldest at 05:00, warmest at 15:00
    weather_sd_c: float = 2.0  # slow weather wander on top of the daily curve
    house_tau_s: float = 6 * 3600.0  # indoor temperature's time constant to the outdoors
    heat_rate_c_s: float = 2.2e-3  # indoor warming while the burner is on, at full capacity
    day_setpoint_c: float = 20.5
    night_setpoint_c: float = 17.0
    night_from_h: float = 23.0
    night_to_h: float = 6.0
    hysteresis_c: float = 0.5  # total band: on below set - h/2, off above set + h/2
    temperature_rise_c: float = 38.0  # supply over return air with the burner on
    exchanger_tau_s: float = 90.0
    high_limit_c: float = 90.0  # supply air above this trips the burner until it cools
    limit_reset_c: float = 70.0
    fan_off_delay_s: float = 90.0
    blower_current_a: float = 3.2
    inducer_current_a: float = 0.6
    standby_current_a: float = 0.15
    indoor_rh_pct: float = 40.0


@dataclass(frozen=True, kw_only=True)
class FridgeParams:
    """A refrigerator: cabinet heat leak, compressor cooling, door openings."""

    room_mean_c: float = 21.0
    room_swing_c: float = 1.5
    setpoint_c: float = 4.0
    hysteresis_c: float = 1.5
    leak_tau_s: float = 7 * 3600.0  # cabinet's time constant to the room, door shut
    door_tau_s: float = 1200.0  # ... the extra exchange while the door is open
    cooling_rate_c_s: float = 2.4e-3  # cabinet cooling with the compressor on, full charge
    min_off_s: float = 180.0  # anti-short-cycle delay
    door_openings_per_day: float = 40.0
    door_open_s: tuple[float, float] = (8.0, 45.0)
    compressor_current_a: float = 1.1
    standby_current_a: float = 0.05


@dataclass(frozen=True, kw_only=True)
class WasherPhase:
    """One step of a washing programme."""

    name: str
    seconds: float = 0.0  # how long it lasts; fill phases last until volume_l is in
    volume_l: float = 0.0  # water to let in (fill phases)
    drum_rpm: float = 0.0  # target drum speed
    agitate: bool = False  # reversing tumble (wash, rinse)
    heat_to_c: float | None = None  # the heater brings the water to this temperature
    drain: bool = False  # the drain pump runs


COTTON_40 = (
    WasherPhase(name="fill", volume_l=14.0),
    WasherPhase(name="wash", seconds=1500.0, drum_rpm=50.0, agitate=True, heat_to_c=40.0),
    WasherPhase(name="drain", seconds=75.0, drain=True),
    WasherPhase(name="spin", seconds=90.0, drum_rpm=600.0, drain=True),
    WasherPhase(name="fill", volume_l=12.0),
    WasherPhase(name="rinse", seconds=360.0, drum_rpm=50.0, agitate=True),
    WasherPhase(name="drain", seconds=75.0, drain=True),
    WasherPhase(name="final_spin", seconds=420.0, drum_rpm=1200.0, drain=True),
)


@dataclass(frozen=True, kw_only=True)
class LoadSlot:
    """A time of day a load is often started: around ``hour`` ± ``jitter_h``."""

    hour: float
    jitter_h: float
    probability: float


@dataclass(frozen=True, kw_only=True)
class WasherParams:
    """A washing machine: programmes started at load slots."""

    programme: tuple[WasherPhase, ...] = COTTON_40
    slots: tuple[LoadSlot, ...] = (
        LoadSlot(hour=9.5, jitter_h=1.5, probability=0.7),
        LoadSlot(hour=19.0, jitter_h=1.0, probability=0.5),
    )
    fill_flow_lpm: float = 11.0
    inlet_water_c: float = 14.0
    room_c: float = 20.0
    heat_rate_c_s: float = 0.025
    spin_tau_s: float = 20.0  # drum speed's time constant
    resonance_rpm: float = 260.0
    damping: float = 0.15
    imbalance_g: tuple[float, float] = (0.08, 0.3)  # vibration far above resonance, per load
    agitate_vibration_g: float = 0.05
    idle_current_a: float = 0.05
    agitate_current_a: float = 0.9
    spin_current_a: float = 2.2  # at 1400 rpm
    drain_pump_current_a: float = 0.25


@dataclass(frozen=True, kw_only=True)
class WaterDraw:
    """One kind of household water use."""

    name: str
    flow_lpm: float
    seconds: tuple[float, float]
    share: float  # of all draws


@dataclass(frozen=True, kw_only=True)
class PumpParams:
    """A well pump filling a pressure tank between the switch's cut-in and cut-out."""

    cut_in_bar: float = 2.8
    cut_out_bar: float = 4.1
    precharge_bar: float = 2.6
    tank_l: float = 80.0
    shutoff_bar: float = 5.5  # the pump's head at zero flow
    relief_bar: float = 5.2
    max_flow_lpm: float = 45.0
    draws_per_day: float = 60.0
    draws: tuple[WaterDraw, ...] = (
        WaterDraw(name="tap", flow_lpm=6.0, seconds=(10.0, 90.0), share=0.6),
        WaterDraw(name="toilet", flow_lpm=9.0, seconds=(40.0, 70.0), share=0.3),
        WaterDraw(name="shower", flow_lpm=9.5, seconds=(240.0, 720.0), share=0.1),
    )
    idle_current_a: float = 0.0
    motor_current_a: float = 4.5  # at full flow
    shutoff_current_a: float = 2.6  # at zero flow
    running_vibration_g: float = 0.12


ApplianceParams = FurnaceParams | FridgeParams | WasherParams | PumpParams


@dataclass(frozen=True, kw_only=True)
class ApplianceModel:
    """One appliance kind: its kit's sensors (in reading order) and its physics."""

    kind: str
    title: str
    aliases: tuple[str, ...]
    interval_s: float  # the kit samples every interval
    sensors: tuple[SensorSpec, ...]
    params: ApplianceParams

    def sensor(self, name: str) -> SensorSpec:
        """The sensor called ``name``."""
        for spec in self.sensors:
            if spec.name == name:
                return spec
        raise ValidationError(
            f"a {self.kind} kit has no sensor {name!r}; it has "
            + ", ".join(s.name for s in self.sensors),
            field="sensors",
        )


# --- sensors -----------------------------------------------------------------------------


def _vibration(description: str) -> SensorSpec:
    return SensorSpec(
        name="vibration_rms_g",
        quantity=Quantity.VIBRATION_RMS,
        unit="g",
        resolution=0.001,
        low=0.0,
        high=4.0,
        noise_sd=0.0015,
        noise_rel=0.08,
        spike=0.6,
        description=description,
    )


def _current(name: str, description: str, high: float) -> SensorSpec:
    return SensorSpec(
        name=name,
        quantity=Quantity.MOTOR_CURRENT,
        unit="A",
        resolution=0.01,
        low=0.0,
        high=high,
        noise_sd=0.02,
        noise_rel=0.01,
        spike=high / 3,
        description=description,
    )


def _duty(description: str) -> SensorSpec:
    # Computed by the kit's firmware from its relay sense line: exact, no noise.
    return SensorSpec(
        name="duty_cycle_pct",
        quantity=Quantity.DUTY_CYCLE,
        unit="%",
        resolution=0.1,
        low=0.0,
        high=100.0,
        spike=60.0,
        description=description,
    )


FURNACE = ApplianceModel(
    kind="furnace",
    title="Gas furnace with blower (HVAC)",
    aliases=("hvac", "heater"),
    interval_s=10.0,
    sensors=(
        SensorSpec(
            name="supply_temp_c",
            quantity=Quantity.TEMPERATURE,
            unit="°C",
            resolution=0.1,
            low=-20.0,
            high=120.0,
            noise_sd=0.15,
            spike=30.0,
            description="supply-air temperature in the plenum",
        ),
        SensorSpec(
            name="supply_rh_pct",
            quantity=Quantity.HUMIDITY,
            unit="%",
            resolution=0.5,
            low=0.0,
            high=100.0,
            noise_sd=0.8,
            spike=40.0,
            description="relative humidity of the supply air",
        ),
        _current("blower_current_a", "blower and inducer motor current", 10.0),
        _vibration("vibration RMS on the blower housing"),
        _duty("share of the last hour the burner was on"),
    ),
    params=FurnaceParams(),
)

FRIDGE = ApplianceModel(
    kind="fridge",
    title="Refrigerator",
    aliases=("refrigerator",),
    interval_s=10.0,
    sensors=(
        SensorSpec(
            name="cabinet_temp_c",
            quantity=Quantity.TEMPERATURE,
            unit="°C",
            resolution=0.1,
            low=-30.0,
            high=50.0,
            noise_sd=0.08,
            spike=15.0,
            description="air temperature in the fresh-food cabinet",
        ),
        _current("compressor_current_a", "compressor motor current", 5.0),
        _vibration("vibration RMS on the compressor mount"),
        _duty("share of the last hour the compressor ran"),
    ),
    params=FridgeParams(),
)

WASHER = ApplianceModel(
    kind="washer",
    title="Washing machine",
    aliases=("washing_machine", "washing-machine"),
    interval_s=5.0,
    sensors=(
        _current("motor_current_a", "drum motor and drain pump current", 8.0),
        _vibration("vibration RMS on the cabinet"),
        SensorSpec(
            name="water_flow_lpm",
            quantity=Quantity.FLOW,
            unit="L/min",
            resolution=0.1,
            low=0.0,
            high=30.0,
            noise_rel=0.02,  # a turbine meter reads exactly 0 with no flow
            spike=12.0,
            description="inlet water flow",
        ),
        SensorSpec(
            name="water_temp_c",
            quantity=Quantity.TEMPERATURE,
            unit="°C",
            resolution=0.1,
            low=0.0,
            high=100.0,
            noise_sd=0.1,
            spike=25.0,
            description="water temperature in the sump",
        ),
    ),
    params=WasherParams(),
)

PUMP = ApplianceModel(
    kind="pump",
    title="Well water pump with pressure tank",
    aliases=("water_pump", "water-pump", "well_pump"),
    interval_s=5.0,
    sensors=(
        SensorSpec(
            name="pressure_bar",
            quantity=Quantity.PRESSURE,
            unit="bar",
            resolution=0.01,
            low=0.0,
            high=10.0,
            noise_sd=0.02,
            spike=2.5,
            description="system pressure at the tank tee",
        ),
        SensorSpec(
            name="flow_lpm",
            quantity=Quantity.FLOW,
            unit="L/min",
            resolution=0.1,
            low=0.0,
            high=80.0,
            noise_rel=0.02,
            spike=25.0,
            description="pump discharge flow",
        ),
        _current("motor_current_a", "pump motor current", 12.0),
        _vibration("vibration RMS on the pump motor"),
        _duty("share of the last hour the pump ran"),
    ),
    params=PumpParams(),
)

APPLIANCES: dict[str, ApplianceModel] = {m.kind: m for m in (FURNACE, FRIDGE, WASHER, PUMP)}

_RELAYED = frozenset({"furnace", "fridge", "pump"})  # a thermostat or pressure switch relay
_ALL = frozenset(APPLIANCES)

FAULTS: dict[str, FaultMode] = {
    f.name: f
    for f in (
        FaultMode(
            name="bearing_wear",
            title="Bearing wear",
            applies_to=_ALL,
            knob=Knob.WEAR,
            default_ramp_s=24 * 3600.0,
            signature="vibration RMS rises (times 1+6·L² while running, with bursts); "
            "motor current +12%·L from friction",
        ),
        FaultMode(
            name="refrigerant_leak",
            title="Refrigerant leak",
            applies_to=frozenset({"fridge"}),
            knob=Knob.CAPACITY_LOSS,
            default_ramp_s=3 * 24 * 3600.0,
            signature="cooling capacity falls (-80%·L): longer compressor runs, duty cycle up, "
            "compressor current -20%·L, then the cabinet temperature drifts up",
        ),
        FaultMode(
            name="stuck_relay_on",
            title="Relay stuck closed",
            applies_to=_RELAYED,
            knob=Knob.STICK_ON,
            signature="burner / compressor / pump fails to stop (never, at level 1): "
            "duty cycle → 100%; house overheats, cabinet freezes, pressure to the relief valve",
        ),
        FaultMode(
            name="stuck_relay_off",
            title="Relay stuck open",
            applies_to=_RELAYED,
            knob=Knob.STICK_OFF,
            signature="burner / compressor / pump fails to start (never, at level 1): "
            "duty cycle → 0; supply air cold, cabinet warms, pressure falls with use",
        ),
        FaultMode(
            name="clogged_filter",
            title="Clogged filter",
            applies_to=frozenset({"furnace", "pump", "washer"}),
            knob=Knob.RESTRICTION,
            default_ramp_s=2 * 24 * 3600.0,
            signature="furnace: airflow -60%·L, supply air hotter (may trip the high limit), "
            "blower current lower, longer runs; pump: flow lower, current lower, longer runs, "
            "cavitation vibration; washer: inlet flow -70%·L, fills take longer",
        ),
        FaultMode(
            name="sensor_dropout",
            title="Sensor dropout",
            applies_to=_ALL,
            sensor_fault=SensorFault.DROPOUT,
            default_sensors="first",  # a loose lead: one sensor, not the whole kit
            signature="readings missing (left out of the payload; NaN in arrays) "
            "with probability L",
        ),
        FaultMode(
            name="sensor_stuck",
            title="Sensor stuck",
            applies_to=_ALL,
            sensor_fault=SensorFault.STUCK,
            default_sensors="first",
            signature="the sensor repeats the value it read when the fault began",
        ),
        FaultMode(
            name="spikes",
            title="Spikes",
            applies_to=_ALL,
            sensor_fault=SensorFault.SPIKES,
            signature=f"isolated outliers of 1-2 times the sensor's spike size, "
            f"{SPIKE_RATE:.0%}·L of samples per sensor, never two in a row",
        ),
    )
}

NORMAL = "normal"  # the label of a reading taken while no fault is injected


def appliance(name: str, *, source: str | None = None, field: str | None = None) -> ApplianceModel:
    """The appliance model called ``name`` or one of its aliases (case-insensitive)."""
    wanted = name.strip().lower()
    for model in APPLIANCES.values():
        if wanted == model.kind or wanted in model.aliases:
            return model
    known = ", ".join(f"{m.kind} ({', '.join(m.aliases)})" for m in APPLIANCES.values())
    raise ValidationError(f"unknown appliance {name!r}; known: {known}", source=source, field=field)


def fault_mode(name: str, *, source: str | None = None, field: str | None = None) -> FaultMode:
    """The fault mode called ``name``."""
    mode = FAULTS.get(name.strip().lower())
    if mode is None:
        raise ValidationError(
            f"unknown fault {name!r}; known: {', '.join(FAULTS)}", source=source, field=field
        )
    return mode
