"""The search core: scores, criteria and ask/tell strategies over plain records. No torch."""
