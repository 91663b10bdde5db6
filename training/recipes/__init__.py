"""Recipes that run several training stages end to end."""
