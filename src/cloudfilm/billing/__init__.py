"""Billing of cloud films (收费) and reconciliation with the HIS (对账)."""
