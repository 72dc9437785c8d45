"""Watch mode: a PACS export folder processed study by study, exactly once, through restarts."""
