"""The monitor (design §7): the academy's metrics and the runs' health, with alerts."""
