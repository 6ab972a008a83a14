"""Unit state: what each unit should be, what it is, and keeping the two together.

* :mod:`gateway.units.manager`: :class:`~gateway.units.manager.UnitManager`, applying a
  verified command (its durability steps are in that module's docstring);
* :mod:`gateway.units.relock`: relocking when an unlock ends; :mod:`gateway.units.timers`
  holds the monotonic deadlines;
* :mod:`gateway.units.reconcile`: reading the hardware back and correcting drift;
* :mod:`gateway.units.core`: the state and steps the three share;
  :mod:`gateway.units.outcome`: what a command came to;
* :mod:`gateway.units.executor`: one operation at a time per unit, in arrival order;
* :mod:`gateway.units.hardware`: building the site's controllers from the config.
"""
