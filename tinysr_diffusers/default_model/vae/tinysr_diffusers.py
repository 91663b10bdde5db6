# Written by tinysr_diffusers: it only imports the installed package (pip install tinysr-diffusers).
from tinysr_diffusers import *  # noqa: F401,F403
