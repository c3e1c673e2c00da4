"""Converters between sepconv weights and other frameworks' layouts."""
