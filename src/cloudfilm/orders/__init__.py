"""Imaging orders (ORM^O01, OMI^O23, FHIR ServiceRequest) and the visits they belong to."""
