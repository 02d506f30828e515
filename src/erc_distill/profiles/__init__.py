"""Device profiles (YAML package data, or the user's own file) and the latency profiler."""

from erc_distill.profiles.spec import DeviceProfile, load_profile, profile_names

__all__ = ["DeviceProfile", "load_profile", "profile_names"]
