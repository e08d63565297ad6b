"""One module per tab of the web app; each ``create_<tab>_tab(state, registry)`` holds its layout and its handlers."""
