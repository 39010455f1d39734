"""Patient master index: one person, many identifiers, demographics with history, merge."""
