"""Objective implementations by name, and the objective of a model family (models.FAMILIES)."""
from diffusion.ddpm import DDPMObjective
from errors import UserError
from models import family_of
from transport.objective import FlowObjective

from .interface import Objective

OBJECTIVES = {DDPMObjective.name: DDPMObjective, FlowObjective.name: FlowObjective}


def create_objective(kind: str, **options) -> Objective:
    """The objective called `kind` ("ddpm" or "flow"), built with its constructor options."""
    if kind not in OBJECTIVES:
        raise UserError(f"unknown objective {kind!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind](**options)


def objective_for_model(model_name: str, **options) -> Objective:
    """The objective a registered model trains and samples with (its family's, models.FAMILIES)."""
    return create_objective(family_of(model_name).objective, **options)


def describe(objective: Objective) -> dict:
    """{"kind": name, **options}: what a checkpoint records to rebuild the objective."""
    return {"kind": objective.name, **objective.options()}


def from_description(description: dict) -> Objective:
    options = dict(description)
    return create_objective(options.pop("kind"), **options)
