"""Reading results: `specreg runs`, `specreg export`, and `specreg confirm`'s reseeding of the best configs."""
